//! Atomic install of a rendered file: `dest` is always the whole old or the whole new file.
//!
//! Stage next to `dest` (mode 0600, created exclusively), fsync, prove it (`haproxy -c`) when the
//! template asks, set mode and owner, keep the current file as `<dest>.prev`, rename over
//! `dest`, fsync the directory. Any failure removes the staged file and leaves `dest` untouched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::{self, ValidateError};
use crate::config::TemplateConfig;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    #[error("{what} {name:?} of {dest} does not exist on this host")]
    NoSuchOwner {
        what: &'static str,
        name: String,
        dest: PathBuf,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rendered bytes equal the installed file: nothing was written.
    Unchanged,
    /// The new file is in place; `previous` holds what it replaced (None: there was no file).
    Installed { previous: Option<Vec<u8>> },
}

/// How to prove a staged file.
#[derive(Debug, Clone)]
pub struct Check {
    pub binary: String,
    pub timeout: Duration,
    /// Run `haproxy -c` as this user when haconfd runs as root (`[haproxy] check_user`).
    pub user: Option<String>,
}

/// The path of the last-good copy kept beside `dest`.
pub fn prev_path(dest: &Path) -> PathBuf {
    sibling(dest, "", ".prev")
}

fn sibling(dest: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!("{prefix}{name}{suffix}"))
}

/// Reads the installed file, `None` when there is none.
pub fn read_installed(dest: &Path) -> Result<Option<Vec<u8>>, InstallError> {
    match fs::read(dest) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", dest)(e)),
    }
}

/// Writes `bytes` to a new 0600 file next to `dest`, fsynced. The caller removes it.
pub fn stage(dest: &Path, bytes: &[u8]) -> Result<PathBuf, InstallError> {
    let dir = parent(dest);
    fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
    for attempt in 0..16u32 {
        let staged = sibling(
            dest,
            ".",
            &format!(".haconfd-{}-{attempt}.tmp", std::process::id()),
        );
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("cannot create staged file", &staged)(e)),
        };
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&staged);
            return Err(io("cannot write staged file", &staged)(e));
        }
        return Ok(staged);
    }
    Err(InstallError::Io {
        action: "cannot create a staged file beside",
        path: dest.to_owned(),
        source: std::io::Error::other("16 staged names already taken"),
    })
}

fn parent(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Installs `bytes` as `t.dest`, proving it first when `check` is given.
pub async fn install(
    t: &TemplateConfig,
    bytes: &[u8],
    check: Option<&Check>,
) -> Result<Outcome, InstallError> {
    install_over(t, read_installed(&t.dest)?, bytes, check).await
}

/// [`install`] over `current`, the installed file as the caller has just read it.
pub async fn install_over(
    t: &TemplateConfig,
    current: Option<Vec<u8>>,
    bytes: &[u8],
    check: Option<&Check>,
) -> Result<Outcome, InstallError> {
    if current.as_deref() == Some(bytes) {
        // Same bytes, but the config may have asked for another mode or owner since.
        set_owner(&t.dest, t)?;
        let mode = fs::metadata(&t.dest)
            .map_err(io("cannot read the mode of", &t.dest))?
            .permissions()
            .mode()
            & 0o7777;
        if mode != t.mode {
            fs::set_permissions(&t.dest, fs::Permissions::from_mode(t.mode))
                .map_err(io("cannot set the mode of", &t.dest))?;
        }
        return Ok(Outcome::Unchanged);
    }
    let staged = stage(&t.dest, bytes)?;
    let result = finish(t, &staged, current.as_deref(), check).await;
    if result.is_err() {
        let _ = fs::remove_file(&staged);
    }
    result.map(|()| Outcome::Installed { previous: current })
}

async fn finish(
    t: &TemplateConfig,
    staged: &Path,
    current: Option<&[u8]>,
    check: Option<&Check>,
) -> Result<(), InstallError> {
    if let Some(c) = check {
        validate::check_as(&c.binary, staged, c.timeout, c.user.as_deref()).await?;
    }
    set_owner(staged, t)?;
    fs::set_permissions(staged, fs::Permissions::from_mode(t.mode))
        .map_err(io("cannot set the mode of", staged))?;
    if let Some(prev) = current {
        keep_previous(&t.dest, prev)?;
    }
    fs::rename(staged, &t.dest).map_err(io("cannot rename the staged file over", &t.dest))?;
    sync_dir(parent(&t.dest))
}

/// Writes the file being replaced to `<dest>.prev`, atomically, so that an operator (and a
/// failed reload) can go back to it.
fn keep_previous(dest: &Path, prev: &[u8]) -> Result<(), InstallError> {
    let target = prev_path(dest);
    // The installed file is the previous one: a hard link keeps it without writing or syncing
    // a byte (the directory fsync after the main rename covers the new name).
    let link = sibling(
        dest,
        ".",
        &format!(".haconfd-{}-prev.tmp", std::process::id()),
    );
    let _ = fs::remove_file(&link);
    if fs::hard_link(dest, &link).is_ok() {
        if fs::rename(&link, &target).is_ok() {
            return Ok(());
        }
        let _ = fs::remove_file(&link);
    }
    let staged = stage(dest, prev)?;
    let r = fs::rename(&staged, &target).map_err(io("cannot keep the previous file as", &target));
    if r.is_err() {
        let _ = fs::remove_file(&staged);
    }
    r
}

/// Puts the previous file back after a failed reload: the reverse install, without a check (it
/// was proven when it was installed).
pub fn restore(t: &TemplateConfig, previous: Option<&[u8]>) -> Result<(), InstallError> {
    match previous {
        Some(bytes) => {
            let staged = stage(&t.dest, bytes)?;
            fs::set_permissions(&staged, fs::Permissions::from_mode(t.mode))
                .map_err(io("cannot set the mode of", &staged))?;
            set_owner(&staged, t)?;
            fs::rename(&staged, &t.dest).map_err(io("cannot restore", &t.dest))?;
        }
        None => fs::remove_file(&t.dest).map_err(io("cannot remove", &t.dest))?,
    }
    sync_dir(parent(&t.dest))
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync directory", dir))
}

fn set_owner(path: &Path, t: &TemplateConfig) -> Result<(), InstallError> {
    if t.owner.is_none() && t.group.is_none() {
        return Ok(());
    }
    let uid = match &t.owner {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| InstallError::NoSuchOwner {
                    what: "owner",
                    name: name.clone(),
                    dest: t.dest.clone(),
                })?
                .uid
                .as_raw(),
        ),
        None => None,
    };
    let gid = match &t.group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| InstallError::NoSuchOwner {
                    what: "group",
                    name: name.clone(),
                    dest: t.dest.clone(),
                })?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    std::os::unix::fs::chown(path, uid, gid).map_err(io("cannot change the owner of", path))
}
