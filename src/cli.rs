//! Parsing what people type: remote specs, `-o` option lists, sizes, durations and key files.
//! Every error is one line that says what is wrong and what to do.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

pub const DEFAULT_PORT: u16 = 7447;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub host: String,
    pub port: Option<u16>,
    pub share: String,
    /// Subdirectory inside the share, without leading or trailing '/'.
    pub subdir: String,
}

/// `HOST[:PORT]:/SHARE[/SUBDIR]`, HOST being a name, an IPv4 address or `[IPv6]`.
pub fn parse_remote(s: &str) -> Result<RemoteSpec, String> {
    let bad = |why: &str| format!("bad remote '{s}': {why} (expected HOST[:PORT]:/SHARE[/SUBDIR], e.g. server:/data)");
    let (host, rest) = if let Some(r) = s.strip_prefix('[') {
        let end = r.find(']').ok_or_else(|| bad("missing ']' after IPv6 address"))?;
        (r[..end].to_string(), &r[end + 1..])
    } else {
        let i = s.find(':').ok_or_else(|| bad("no ':' after the host"))?;
        (s[..i].to_string(), &s[i..])
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let rest = rest.strip_prefix(':').ok_or_else(|| bad("no ':' after the host"))?;
    let (port, path) = match rest.find(":/") {
        Some(i) if !rest.starts_with('/') => {
            let p: u16 = rest[..i].parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?;
            if p == 0 {
                return Err(bad("the port is not a number from 1 to 65535"));
            }
            (Some(p), &rest[i + 1..])
        }
        _ => (None, rest),
    };
    let path = path.strip_prefix('/').ok_or_else(|| bad("the share must start with '/'"))?;
    let mut parts = path.splitn(2, '/');
    let share = parts.next().unwrap_or("").to_string();
    if share.is_empty() {
        return Err(bad("no share name"));
    }
    let subdir = parts.next().unwrap_or("").trim_matches('/').to_string();
    if subdir.split('/').any(|c| c == ".." || c == ".") || subdir.contains("//") {
        return Err(bad("the subdirectory may not contain '.', '..' or empty components"));
    }
    Ok(RemoteSpec { host, port, share, subdir })
}

impl RemoteSpec {
    pub fn resolve(&self, port: u16) -> Result<SocketAddr, String> {
        let port = self.port.unwrap_or(port);
        let mut addrs = (self.host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve host '{}': {e}", self.host))?;
        addrs.next().ok_or_else(|| format!("host '{}' has no address", self.host))
    }
}

/// Split a mount-style option string on unescaped commas; `\,` and `\\` are escapes.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ',' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// "256M", "10G", "4096", "1.5G" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 256M, 10G)"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("'{s}' is not a size (e.g. 256M, 10G)"));
    }
    Ok((v * mul as f64) as u64)
}

/// Seconds, fractions allowed: "1", "0.5".
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=86400.0 * 365.0).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_hex_key(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(k)
}

/// Read a key file: 64 hex characters (32 bytes), optional trailing newline.
pub fn load_key(path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read key file {}: {e} (copy the server's key file here, or pass -o keyfile=FILE)", path.display())
    })?;
    parse_hex_key(&text).ok_or_else(|| {
        format!("key file {} is not 64 hex characters (make one with wraith-serve --key FILE)", path.display())
    })
}

/// Load the key at `path`, or create it (mode 0600, 32 random bytes in hex) if it does not exist.
/// Returns the key and whether it was created.
pub fn load_or_create_key(path: &Path) -> Result<([u8; 32], bool), String> {
    if path.exists() {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!("key file {} is readable by others; run chmod 600 on it", path.display());
        }
        return Ok((load_key(path)?, false));
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
    writeln!(f, "{hex}").map_err(|e| format!("cannot write key file {}: {e}", path.display()))?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_specs() {
        let r = parse_remote("server:/data").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.share.as_str(), r.subdir.as_str()), ("server", None, "data", ""));
        let r = parse_remote("10.0.0.1:9000:/data/sub/dir/").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.share.as_str(), r.subdir.as_str()), ("10.0.0.1", Some(9000), "data", "sub/dir"));
        let r = parse_remote("[::1]:/s").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", None));
        let r = parse_remote("[fe80::1]:7000:/s/x").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.subdir.as_str()), ("fe80::1", Some(7000), "x"));
        for bad in ["server", "server:", "server:data", ":/data", "server:/", "h:0:/s", "h:99999:/s", "[::1/s", "h:/s/../x"] {
            let e = parse_remote(bad).unwrap_err();
            assert!(e.contains("expected HOST"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_and_sizes() {
        assert_eq!(split_options("a=1,b,c=x\\,y"), vec!["a=1", "b", "c=x,y"]);
        assert_eq!(split_options(""), Vec::<String>::new());
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_secs("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_secs("-1").is_err());
    }

    #[test]
    fn key_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/k");
        let (k, created) = load_or_create_key(&p).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = load_or_create_key(&p).unwrap();
        assert!(!created);
        assert_eq!(k, k2);
        std::fs::write(d.path().join("bad"), "xyz").unwrap();
        assert!(load_key(&d.path().join("bad")).unwrap_err().contains("64 hex"));
        assert!(load_key(&d.path().join("missing")).unwrap_err().contains("keyfile"));
    }
}
