//! The unprivileged account the servers run as ([`RunAs`]): this process's
//! own, or `postgres` (else `nobody`) when it runs as root.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::Error;

/// The unprivileged account the servers run as.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct RunAs {
    ids: Option<(u32, u32)>,
    /// The account's name: what `initdb` names the superuser by default.
    pub(crate) name: String,
}

impl RunAs {
    /// Workspace-internal.
    pub fn detect() -> Result<Self, Error> {
        let me = nix::unistd::Uid::effective();
        if !me.is_root() {
            let name = nix::unistd::User::from_uid(me)
                .ok()
                .flatten()
                .map(|u| u.name)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default();
            return Ok(RunAs { ids: None, name });
        }
        for wanted in ["postgres", "nobody"] {
            let user = nix::unistd::User::from_name(wanted).map_err(|e| {
                Error::io(
                    format!("looking up the user {wanted:?} to run the servers as"),
                    std::io::Error::from(e),
                )
            })?;
            if let Some(u) = user {
                tracing::debug!(target: "railyard::local", user = wanted, "running the servers as an unprivileged user");
                return Ok(RunAs {
                    ids: Some((u.uid.as_raw(), u.gid.as_raw())),
                    name: wanted.to_owned(),
                });
            }
        }
        Err(Error::Local(
            "running as root, and neither a `postgres` nor a `nobody` user exists to run the servers as (PostgreSQL refuses to run as root); create one with `useradd --system postgres`".into(),
        ))
    }

    /// The account's user and group ids, when the servers run as another
    /// account than this process's.
    /// Workspace-internal.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.ids
    }

    /// Workspace-internal.
    pub fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(cwd).stdin(Stdio::null());
        // LANG/LC_* of the caller may name locales the server does not have.
        c.env("LC_ALL", "C");
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
            c.env("HOME", cwd);
        }
        c
    }

    /// Workspace-internal.
    pub fn own(&self, path: &Path) -> Result<(), Error> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }
}
