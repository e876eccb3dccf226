//! Secrets, and where the password of new connections comes from.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The most bytes Railyard reads from a password file (64 KiB). A longer file
/// is refused: a password is short, and an endless file (`/dev/zero`) must not
/// be read into memory.
pub const MAX_PASSWORD_FILE_LEN: u64 = 64 * 1024;

/// A secret string (a password). Its `Debug` prints `***` and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call this only where the value goes to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the password for new connections comes from. It is read again for every
/// new connection, so a rotated password is used without a restart.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// The password in the URL, or none.
    #[default]
    FromUrl,
    /// A fixed password.
    Static(Secret),
    /// The value of an environment variable, read at each connect.
    Env(String),
    /// The contents of a file (trailing newline removed), read at each connect
    /// without blocking the async runtime. The file must be a regular file of at
    /// most [`MAX_PASSWORD_FILE_LEN`] bytes, in UTF-8, without NUL bytes.
    File(PathBuf),
    /// A function called at each connect (a secrets manager, for example).
    Custom(Arc<dyn Fn() -> Result<Secret, String> + Send + Sync>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::FromUrl => f.write_str("FromUrl"),
            Credentials::Static(_) => f.write_str("Static(***)"),
            Credentials::Env(v) => f.debug_tuple("Env").field(v).finish(),
            Credentials::File(p) => f.debug_tuple("File").field(p).finish(),
            Credentials::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Why a password (or a small file such as a CA certificate) could not be read.
/// The message never holds the password; `source` is the underlying error,
/// when there is one.
#[derive(Debug)]
pub(crate) struct ReadError {
    pub(crate) message: String,
    pub(crate) source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ReadError {
    fn new(message: String) -> Self {
        ReadError {
            message,
            source: None,
        }
    }

    fn caused(message: String, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ReadError {
            message,
            source: Some(Box::new(source)),
        }
    }
}

impl Credentials {
    /// Reads the current password. `url_password` is the one parsed from the URL.
    /// A password file is read on the blocking pool, never on the caller's task.
    pub(crate) async fn password(
        &self,
        url_password: Option<&Secret>,
    ) -> Result<Option<Secret>, ReadError> {
        match self {
            Credentials::FromUrl => Ok(url_password.cloned()),
            Credentials::Static(s) => Ok(Some(s.clone())),
            Credentials::Env(var) => match std::env::var(var) {
                Ok(v) => Ok(Some(Secret::new(v))),
                Err(e) => Err(ReadError::caused(
                    format!(
                        "environment variable {var} (the password source) is not set or not UTF-8"
                    ),
                    e,
                )),
            },
            Credentials::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_password_file(&path))
                    .await
                    .map_err(|e| ReadError::caused("reading the password file failed".into(), e))?
                    .map(Some)
            }
            Credentials::Custom(f) => f().map(Some).map_err(ReadError::new),
        }
    }
}

/// What kind of file system object `meta` describes, for error messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a small regular file, at most `max` bytes, refusing anything else
/// (directories, FIFOs, devices, longer files) with a message that names `what`
/// and the path. Blocking: call it on the blocking pool.
pub(crate) fn read_small_file(path: &Path, what: &str, max: u64) -> Result<Vec<u8>, ReadError> {
    let shown = path.display();
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(ReadError::new(format!(
                "{what} {shown} is {}, not a regular file; point it at a file",
                file_kind(meta)
            )));
        }
        if meta.len() > max {
            return Err(ReadError::new(format!(
                "{what} {shown} holds {} bytes, more than the limit of {max} bytes",
                meta.len()
            )));
        }
        Ok(())
    };
    // Looked at before opening: opening a FIFO would wait for a writer.
    let meta = std::fs::metadata(path)
        .map_err(|e| ReadError::caused(format!("cannot read {what} {shown}: {e}"), e))?;
    check(&meta)?;
    let file = std::fs::File::open(path)
        .map_err(|e| ReadError::caused(format!("cannot read {what} {shown}: {e}"), e))?;
    // The path may have been replaced in between: look at what was opened.
    let meta = file
        .metadata()
        .map_err(|e| ReadError::caused(format!("cannot read {what} {shown}: {e}"), e))?;
    check(&meta)?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::caused(format!("cannot read {what} {shown}: {e}"), e))?;
    if bytes.len() as u64 > max {
        return Err(ReadError::new(format!(
            "{what} {shown} holds more than the limit of {max} bytes"
        )));
    }
    Ok(bytes)
}

/// Reads a password file: a regular file of at most [`MAX_PASSWORD_FILE_LEN`]
/// bytes of UTF-8 without NUL bytes; trailing line ends are removed.
fn read_password_file(path: &Path) -> Result<Secret, ReadError> {
    let bytes = read_small_file(path, "password file", MAX_PASSWORD_FILE_LEN)?;
    let shown = path.display();
    // `from_utf8` on a slice: its error holds no bytes of the password.
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ReadError::caused(format!("password file {shown} is not UTF-8"), e))?;
    let text = text.trim_end_matches(['\r', '\n']);
    if text.contains('\0') {
        return Err(ReadError::new(format!(
            "password file {shown} holds a NUL byte, which a password cannot contain"
        )));
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "railyard-secret-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn read(path: &Path) -> Result<Option<Secret>, ReadError> {
        let credentials = Credentials::File(path.to_owned());
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            credentials.password(None),
        )
        .await
        .expect("reading a password file never hangs")
    }

    #[tokio::test]
    async fn a_password_file_is_read_and_its_line_end_removed() {
        let dir = scratch("ok");
        let path = dir.join("pw");
        std::fs::write(&path, "s3cret-pw\r\n").unwrap();
        let pw = read(&path).await.unwrap().unwrap();
        assert_eq!(pw.expose(), "s3cret-pw");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn dev_zero_is_refused_without_reading_it() {
        let err = read(Path::new("/dev/zero")).await.unwrap_err();
        assert!(err.message.contains("/dev/zero"), "{}", err.message);
        assert!(err.message.contains("character device"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_directory_is_refused() {
        let dir = scratch("dir");
        let err = read(&dir).await.unwrap_err();
        assert!(err.message.contains("a directory"), "{}", err.message);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_over_the_bound_is_refused_naming_the_bound() {
        let dir = scratch("long");
        let path = dir.join("pw");
        std::fs::write(&path, vec![b'a'; MAX_PASSWORD_FILE_LEN as usize + 1]).unwrap();
        let err = read(&path).await.unwrap_err();
        assert!(err.message.contains("65536"), "{}", err.message);
        assert!(!err.message.contains("aaaa"), "{}", err.message);
        std::fs::write(&path, vec![b'a'; MAX_PASSWORD_FILE_LEN as usize]).unwrap();
        assert_eq!(
            read(&path).await.unwrap().unwrap().expose().len(),
            MAX_PASSWORD_FILE_LEN as usize
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = scratch("fifo");
        let path = dir.join("pw");
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        let err = read(&path).await.unwrap_err();
        assert!(err.message.contains("a FIFO"), "{}", err.message);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_file_keeps_its_cause_and_bad_contents_are_refused() {
        let dir = scratch("missing");
        let err = read(&dir.join("absent")).await.unwrap_err();
        assert!(err.source.is_some(), "{}", err.message);
        let path = dir.join("nul");
        std::fs::write(&path, "s3cr\0et").unwrap();
        let err = read(&path).await.unwrap_err();
        assert!(err.message.contains("NUL"), "{}", err.message);
        assert!(!err.message.contains("s3cr"), "{}", err.message);
        std::fs::write(&path, [0xff, 0xfe, b'x']).unwrap();
        let err = read(&path).await.unwrap_err();
        assert!(err.message.contains("UTF-8"), "{}", err.message);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
