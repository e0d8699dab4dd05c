//! Unit tests of mount.wraith's option handling.
use super::*;

fn opt(name: &str, value: Option<&str>) -> MountOpt {
    MountOpt {
        name: name.as_bytes().to_vec(),
        value: value.map(|v| v.as_bytes().to_vec()),
    }
}

fn parse(s: &str) -> Vec<MountOpt> {
    parse_options(s.as_bytes()).unwrap()
}

/// The rebuilt `-o` string wraith-mount would get, or the error.
fn rebuilt(s: &str, sloppy: bool) -> Result<String, OptError> {
    let plan = plan(parse_options(s.as_bytes())?, sloppy)?;
    Ok(String::from_utf8(join_options(&plan.forward)).unwrap())
}

fn args(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

#[test]
fn splits_names_and_values() {
    assert_eq!(
        parse("keyfile=/etc/k,hard,port=7447"),
        vec![
            opt("keyfile", Some("/etc/k")),
            opt("hard", None),
            opt("port", Some("7447"))
        ]
    );
    assert_eq!(parse(",,hard,"), vec![opt("hard", None)]);
    assert_eq!(parse("fsname="), vec![opt("fsname", Some(""))]);
    assert_eq!(parse("fsname=a=b"), vec![opt("fsname", Some("a=b"))]);
    assert_eq!(parse(""), vec![]);
}

#[test]
fn escaped_comma_and_backslash() {
    assert_eq!(
        parse(r"keyfile=/k/a\,b,ro"),
        vec![opt("keyfile", Some("/k/a,b")), opt("ro", None)]
    );
    assert_eq!(parse(r"fsname=a\\b"), vec![opt("fsname", Some(r"a\b"))]);
    assert_eq!(
        parse(r"fsname=a\\,ro"),
        vec![opt("fsname", Some(r"a\")), opt("ro", None)]
    );
    // A backslash before anything else stays literal, like mount(8)'s unmangling.
    assert_eq!(parse(r"fsname=a\xb\"), vec![opt("fsname", Some(r"a\xb\"))]);
    assert_eq!(parse(r"fsname=a\=b"), vec![opt("fsname", Some("a=b"))]);
    assert_eq!(parse(r"a\=b=c"), vec![opt("a=b", Some("c"))]);
}

#[test]
fn octal_escapes_and_spaces() {
    assert_eq!(
        parse(r"keyfile=/etc/my\040keys/k"),
        vec![opt("keyfile", Some("/etc/my keys/k"))]
    );
    assert_eq!(
        parse(r"fsname=a\011b\134c"),
        vec![opt("fsname", Some("a\tb\\c"))]
    );
    assert_eq!(parse(r"fsname=a\054b"), vec![opt("fsname", Some("a,b"))]);
    // Not three octal digits, or above 0377: not an escape.
    assert_eq!(parse(r"fsname=\08"), vec![opt("fsname", Some(r"\08"))]);
    assert_eq!(parse(r"fsname=\400"), vec![opt("fsname", Some(r"\400"))]);
    // A space that mount(8) already decoded from fstab arrives as a space.
    assert_eq!(
        parse("keyfile=/etc/my keys/k"),
        vec![opt("keyfile", Some("/etc/my keys/k"))]
    );
    // Octal escapes can produce bytes that are not UTF-8.
    assert_eq!(parse(r"fsname=\377").pop().unwrap().value, Some(vec![0xff]));
}

#[test]
fn double_quotes() {
    assert_eq!(
        parse(r#"fsname="a,b c",ro"#),
        vec![opt("fsname", Some("a,b c")), opt("ro", None)]
    );
    assert_eq!(parse(r#"fsname="x=y""#), vec![opt("fsname", Some("x=y"))]);
    assert_eq!(
        parse(r#"keyfile=/k/"a b"/c"#),
        vec![opt("keyfile", Some("/k/a b/c"))]
    );
    assert_eq!(
        parse(r#"fsname="say \"hi\"""#),
        vec![opt("fsname", Some(r#"say "hi""#))]
    );
    assert_eq!(
        parse_options(br#"fsname="a,b"#),
        Err(OptError::UnterminatedQuote)
    );
    assert_eq!(parse_options(b"=x"), Err(OptError::EmptyName));
}

#[test]
fn rebuilt_values_round_trip_through_escaping() {
    assert_eq!(
        rebuilt(r#"fsname="a,b\c""#, false).unwrap(),
        r"fsname=a\,b\\c"
    );
    assert_eq!(
        rebuilt(r"keyfile=/etc/my\040keys/k", false).unwrap(),
        "keyfile=/etc/my keys/k"
    );
    // Whatever comes out must split back into the same options.
    for input in [
        r"fsname=a\,b,keyfile=/x\\y,hard",
        r#"fsname="p,q,,r",uid=1000"#,
        "fsname=\\\\\\,",
    ] {
        let first = plan(parse(input), false).unwrap().forward;
        let again = parse(&rebuilt(input, false).unwrap());
        assert_eq!(first, again, "{input}");
    }
}

#[test]
fn mount_and_systemd_options_are_dropped() {
    let line = "rw,_netdev,keyfile=/etc/wraith/share.key,nofail,x-systemd.automount,\
                x-systemd.idle-timeout=600,x-systemd.requires=network-online.target,\
                noauto,auto,user,users,nouser,owner,group,defaults,nosuid,nodev,exec,\
                noatime,relatime,atime,strictatime,lazytime,nodiratime,sync,async,\
                comment=backup,x-gvfs-show,hard";
    assert_eq!(
        rebuilt(line, false).unwrap(),
        "keyfile=/etc/wraith/share.key,hard"
    );
}

#[test]
fn every_wraith_option_is_passed_on() {
    let line = "keyfile=/k,port=9,attr_timeout=2,timeout=5,hard,soft,mem_cache=1G,readahead=4M,allow_other,\
                default_permissions,uid=1000,gid=100,ro,threads=4,fsname=srv";
    assert_eq!(rebuilt(line, false).unwrap(), line);
}

#[test]
fn unknown_options_are_rejected_by_name() {
    assert_eq!(
        rebuilt("ro,frobnicate=3", false),
        Err(OptError::Unknown("frobnicate".into()))
    );
    assert_eq!(
        OptError::Unknown("frobnicate".into()).to_string(),
        "unknown option 'frobnicate' (see mount.wraith --help)"
    );
    assert_eq!(
        rebuilt("Keyfile=/k", false),
        Err(OptError::Unknown("Keyfile".into()))
    );
}

#[test]
fn sloppy_ignores_unknown_options() {
    assert_eq!(rebuilt("frobnicate=3,hard,vers=4", true).unwrap(), "hard");
    let p = plan(parse("transport=xdp,keyfile=/k"), true).unwrap();
    assert_eq!(
        String::from_utf8(join_options(&p.forward)).unwrap(),
        "transport=xdp,keyfile=/k"
    );
    // Sloppy does not turn a refusal into acceptance.
    assert!(matches!(rebuilt("suid", true), Err(OptError::Refused(_))));
}

#[test]
fn cache_and_transport_options_are_passed_on() {
    assert_eq!(
        rebuilt("keyfile=/k,cache_size=20G,cache_dir=/var/cache/x,noexec", false).unwrap(),
        "keyfile=/k,cache_size=20G,cache_dir=/var/cache/x,noexec"
    );
    assert_eq!(
        rebuilt("transport=xdp,iface=eth1,xdp_mode=generic", false).unwrap(),
        "transport=xdp,iface=eth1,xdp_mode=generic"
    );
}

#[test]
fn rw_is_dropped_and_setuid_or_devices_refused() {
    // mount(8) always puts rw or ro first; rw is its default, not a request for writes.
    assert_eq!(rebuilt("rw,keyfile=/k", false).unwrap(), "keyfile=/k");
    assert_eq!(rebuilt("ro,keyfile=/k", false).unwrap(), "ro,keyfile=/k");
    for bad in ["suid", "dev", "remount"] {
        let e = rebuilt(&format!("ro,{bad}"), false).unwrap_err();
        assert!(matches!(e, OptError::Refused(_)), "{bad}: {e:?}");
    }
    assert!(rebuilt("suid", false)
        .unwrap_err()
        .to_string()
        .contains("nosuid"));
}

#[test]
fn noexec_is_passed_on() {
    // mount(8) adds noexec,nosuid,nodev for `user` entries; wraith-mount enforces noexec.
    let p = plan(parse("ro,noexec,nosuid,nodev,user"), false).unwrap();
    assert_eq!(p.forward, vec![opt("ro", None), opt("noexec", None)]);
    assert!(p.warnings.is_empty());
}

#[test]
fn value_shape_is_checked() {
    assert_eq!(
        rebuilt("hard=yes", false),
        Err(OptError::TakesNoValue("hard".into()))
    );
    assert!(matches!(
        rebuilt("keyfile", false),
        Err(OptError::NeedsValue("keyfile", _))
    ));
    assert!(matches!(
        rebuilt("keyfile=", false),
        Err(OptError::NeedsValue("keyfile", _))
    ));
    assert!(rebuilt("port", false)
        .unwrap_err()
        .to_string()
        .contains("port=N"));
}

#[test]
fn command_line_as_mount_passes_it() {
    let got = parse_args(&args(&[
        "srv:/share",
        "/mnt/x",
        "-s",
        "-f",
        "-n",
        "-v",
        "-o",
        "rw,hard",
    ]))
    .unwrap();
    let want = Invocation {
        spec: "srv:/share".into(),
        dir: "/mnt/x".into(),
        options: b"rw,hard".to_vec(),
        sloppy: true,
        fake: true,
        verbose: true,
    };
    assert_eq!(got, Parsed::Mount(want));
}

#[test]
fn command_line_clusters_and_attached_values() {
    let Parsed::Mount(inv) = parse_args(&args(&[
        "-fv",
        "-oro",
        "-o",
        "hard",
        "-t",
        "wraith",
        "h:/s",
        "/d",
        "-nokeyfile=/k",
    ]))
    .unwrap() else {
        panic!()
    };
    assert!(inv.fake && inv.verbose && !inv.sloppy);
    assert_eq!(inv.options, b"ro,hard,keyfile=/k".to_vec());
    assert_eq!(
        (inv.spec.as_os_str(), inv.dir.as_os_str()),
        ("h:/s".as_ref(), "/d".as_ref())
    );
    assert!(parse_args(&args(&["h:/s", "/d", "-tfuse.wraith"])).is_ok());
}

#[test]
fn command_line_errors() {
    assert_eq!(parse_args(&args(&["--help"])), Ok(Parsed::Help));
    assert_eq!(parse_args(&args(&["h:/s", "-h"])), Ok(Parsed::Help));
    let e = parse_args(&args(&["h:/s", "/d", "-x"])).unwrap_err();
    assert!(e.contains("'-x'"), "{e}");
    assert!(parse_args(&args(&["h:/s", "/d", "--bogus"]))
        .unwrap_err()
        .contains("--bogus"));
    assert!(parse_args(&args(&["h:/s"]))
        .unwrap_err()
        .contains("expected SPEC and DIR"));
    assert!(parse_args(&args(&["a", "b", "c"])).is_err());
    assert!(parse_args(&args(&["h:/s", "/d", "-o"]))
        .unwrap_err()
        .contains("-o needs"));
    assert!(parse_args(&args(&["h:/s", "/d", "-t", "nfs"]))
        .unwrap_err()
        .contains("'nfs'"));
    assert!(parse_args(&args(&["h:/s", "/d", "-N", "/proc/1/ns/mnt"]))
        .unwrap_err()
        .contains("-N"));
    // After `--` everything is positional, even a leading dash.
    assert!(parse_args(&args(&["--", "h:/s", "-d"])).is_ok());
}

#[test]
fn shell_quote_for_display() {
    assert_eq!(shell_quote("keyfile=/k,hard"), "keyfile=/k,hard");
    assert_eq!(shell_quote("a b"), "'a b'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
}

/// `--help` names every option passed on to wraith-mount.
#[test]
fn help_lists_every_option_passed_on() {
    let names = [
        "keyfile", "port", "attr_timeout", "timeout", "mem_cache", "readahead", "uid", "gid", "threads", "fsname", "cache_dir",
        "cache_size", "cache_io", "transport", "iface", "xdp_mode", "hard", "soft", "allow_other", "default_permissions", "ro",
        "noexec", "passthrough", "nopassthrough",
    ];
    for n in names {
        assert_ne!(classify(n), Class::Drop, "{n}");
        let listed = HELP.lines().any(|l| l.trim_start().split([' ', '=', ',']).any(|w| w == n));
        assert!(listed, "{n} is passed on but not in --help");
    }
}
