//! Where the PostgreSQL server binaries are, and which shared libraries the
//! server can load.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;

/// Where the PostgreSQL server binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub(crate) dir: PathBuf,
}

impl Binaries {
    /// Finds `initdb`, `pg_ctl` and `pg_basebackup`: in `$PATH`, in
    /// `pg_config --bindir`, or in the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn find() -> Result<Self, Error> {
        let has_all = |d: &Path| {
            ["initdb", "pg_ctl", "pg_basebackup", "postgres"]
                .iter()
                .all(|b| d.join(b).is_file())
        };
        if let Ok(dir) = std::env::var("RAILYARD_PG_BINDIR") {
            let d = PathBuf::from(dir);
            if has_all(&d) {
                return Ok(Binaries { dir: d });
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                if has_all(&d) {
                    return Ok(Binaries { dir: d });
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_all(&d) {
                return Ok(Binaries { dir: d });
            }
        }
        if let Some(dir) = railyard::config::versioned_pg_bindirs()
            .into_iter()
            .find(|d| has_all(d))
        {
            return Ok(Binaries { dir });
        }
        Err(Error::Local(
            "no PostgreSQL server binaries found (looked for initdb, pg_ctl, pg_basebackup and postgres in $PATH, `pg_config --bindir` and /usr/lib/postgresql/*/bin). Install them: `apt-get install postgresql` on Debian/Ubuntu, `dnf install postgresql-server` on Fedora, `brew install postgresql` on macOS; or set RAILYARD_PG_BINDIR, or point DATABASE_URL / TEST_DATABASE_URL at a running server".into(),
        ))
    }

    /// Whether the server can load the shared library `name` (for example
    /// `pg_stat_statements`): it is in `pg_config --pkglibdir`, or in the
    /// `lib` directory beside the binaries (Debian's layout).
    pub fn has_library(&self, name: &str) -> bool {
        let file = format!("{name}.so");
        let pg_config = self.dir.join("pg_config");
        if let Ok(out) = Command::new(&pg_config).arg("--pkglibdir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if d.join(&file).is_file() {
                return true;
            }
        }
        self.dir
            .parent()
            .is_some_and(|p| p.join("lib").join(&file).is_file())
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
