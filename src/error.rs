//! Errors named by meaning. They become an errno in exactly one place ([`Error::errno`]) and a
//! wire code in exactly one place ([`Error::to_wire`] / [`Error::from_wire`]).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No such file, directory or share.
    NotFound,
    /// A path component is not a directory.
    NotDir,
    /// The operation needs a directory / a non-directory.
    IsDir,
    /// The server refused access (permission bits on the server, or an escape attempt).
    Denied,
    /// A path or name is too long for the protocol or the server.
    NameTooLong,
    /// Too many symlinks, or a path that would leave the export.
    Loop,
    /// The file changed on the server since it was opened: the old version is gone.
    Stale,
    /// Data did not match its BLAKE3 value, repeatedly.
    IntegrityMismatch,
    /// The server did not answer before the deadline.
    RemoteTimeout,
    /// The server rejected our key.
    AuthFailed,
    /// Writes are not supported.
    ReadOnly,
    /// No such extended attribute.
    NoXattr,
    /// Caller's buffer too small.
    Range,
    /// Malformed request or argument.
    Invalid,
    /// The server is still hashing the file; ask again shortly.
    Busy,
    /// The caller was interrupted (signal) while waiting.
    Interrupted,
    /// Operation not supported for this object.
    NotSupported,
    /// The server speaks another version of the wraith protocol (its version when known, else 0).
    WrongVersion(u8),
    /// Any other I/O error on the server or locally, with the raw errno when known.
    Io(i32),
}

impl Error {
    /// The one errno mapping.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::Denied => libc::EACCES,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::Loop => libc::ELOOP,
            Error::Stale => libc::ESTALE,
            Error::IntegrityMismatch => libc::EIO,
            Error::RemoteTimeout => libc::EIO,
            Error::AuthFailed => libc::EACCES,
            Error::ReadOnly => libc::EROFS,
            Error::NoXattr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::Invalid => libc::EINVAL,
            Error::Busy => libc::EAGAIN,
            Error::Interrupted => libc::EINTR,
            Error::NotSupported => libc::EOPNOTSUPP,
            Error::WrongVersion(_) => libc::EPROTONOSUPPORT,
            Error::Io(e) if *e > 0 => *e,
            Error::Io(_) => libc::EIO,
        }
    }

    /// From a local `std::io::Error` (server side).
    pub fn from_io(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) => Error::NotFound,
            Some(libc::ENOTDIR) => Error::NotDir,
            Some(libc::EISDIR) => Error::IsDir,
            Some(libc::EACCES) | Some(libc::EPERM) => Error::Denied,
            Some(libc::ENAMETOOLONG) => Error::NameTooLong,
            Some(libc::ELOOP) | Some(libc::EXDEV) => Error::Loop,
            Some(libc::ENODATA) => Error::NoXattr,
            Some(libc::EINVAL) => Error::Invalid,
            Some(code) => Error::Io(code),
            None => Error::Io(libc::EIO),
        }
    }

    /// Wire code: one u16 per meaning (see docs/PROTOCOL.md), raw errno in the upper range.
    pub fn to_wire(&self) -> u16 {
        match self {
            Error::NotFound => 1,
            Error::NotDir => 2,
            Error::IsDir => 3,
            Error::Denied => 4,
            Error::NameTooLong => 5,
            Error::Loop => 6,
            Error::Stale => 7,
            Error::IntegrityMismatch => 8,
            Error::RemoteTimeout => 9,
            Error::AuthFailed => 10,
            Error::ReadOnly => 11,
            Error::NoXattr => 12,
            Error::Range => 13,
            Error::Invalid => 14,
            Error::Busy => 15,
            Error::Interrupted => 16,
            Error::NotSupported => 17,
            Error::WrongVersion(_) => 18,
            Error::Io(e) => 0x8000 | (*e as u16 & 0x7fff),
        }
    }

    pub fn from_wire(code: u16) -> Self {
        match code {
            1 => Error::NotFound,
            2 => Error::NotDir,
            3 => Error::IsDir,
            4 => Error::Denied,
            5 => Error::NameTooLong,
            6 => Error::Loop,
            7 => Error::Stale,
            8 => Error::IntegrityMismatch,
            9 => Error::RemoteTimeout,
            10 => Error::AuthFailed,
            11 => Error::ReadOnly,
            12 => Error::NoXattr,
            13 => Error::Range,
            14 => Error::Invalid,
            15 => Error::Busy,
            16 => Error::Interrupted,
            17 => Error::NotSupported,
            18 => Error::WrongVersion(0),
            c if c & 0x8000 != 0 => Error::Io((c & 0x7fff) as i32),
            _ => Error::Io(libc::EIO),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::NotFound => "not found",
            Error::NotDir => "not a directory",
            Error::IsDir => "is a directory",
            Error::Denied => "permission denied",
            Error::NameTooLong => "name too long",
            Error::Loop => "path leaves the export or has too many symlinks",
            Error::Stale => "file changed on the server",
            Error::IntegrityMismatch => "data failed BLAKE3 verification",
            Error::RemoteTimeout => "server did not answer in time",
            Error::AuthFailed => "server rejected the key",
            Error::ReadOnly => "read-only filesystem",
            Error::NoXattr => "no such attribute",
            Error::Range => "buffer too small",
            Error::Invalid => "invalid argument",
            Error::Busy => "server busy hashing the file",
            Error::Interrupted => "interrupted",
            Error::NotSupported => "not supported",
            Error::WrongVersion(0) => "the server speaks another wraith protocol version",
            Error::WrongVersion(v) => return write!(f, "the server speaks wraith protocol version {v}"),
            Error::Io(e) => return write!(f, "I/O error (errno {e})"),
        };
        f.write_str(s)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip() {
        let all = [
            Error::NotFound,
            Error::NotDir,
            Error::IsDir,
            Error::Denied,
            Error::NameTooLong,
            Error::Loop,
            Error::Stale,
            Error::IntegrityMismatch,
            Error::RemoteTimeout,
            Error::AuthFailed,
            Error::ReadOnly,
            Error::NoXattr,
            Error::Range,
            Error::Invalid,
            Error::Busy,
            Error::Interrupted,
            Error::NotSupported,
            Error::WrongVersion(0),
            Error::Io(libc::EMFILE),
        ];
        for e in all {
            assert_eq!(Error::from_wire(e.to_wire()), e);
        }
    }
}
