//! Atomic install of a rendered file: `dest` is always the whole old or the whole new file.
//!
//! Stage next to `dest` (mode 0600, created exclusively), fsync, prove it (`haproxy -c`) when the
//! template asks, set mode and owner, set the current file aside, rename over `dest`, name the
//! one set aside `<dest>.prev`, fsync the directory. Any failure before the rename removes what
//! was staged and leaves `dest` and `<dest>.prev` untouched; a staged file that cannot be removed
//! (a file system that turned read-only) is logged, and the next install beside `dest` removes it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::{self, ValidateError};
use crate::config::{HaproxyConfig, TemplateConfig};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}: {why}", why = describe(.source))]
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

impl InstallError {
    /// Why the disk refused, in a few words for a metric label: `disk_full`, `read_only`,
    /// `quota_exceeded` or `io`; None when the disk is not to blame (`haproxy -c`, an owner).
    pub fn disk_reason(&self) -> Option<&'static str> {
        let InstallError::Io { source, .. } = self else {
            return None;
        };
        Some(match source.kind() {
            std::io::ErrorKind::StorageFull => "disk_full",
            std::io::ErrorKind::ReadOnlyFilesystem => "read_only",
            std::io::ErrorKind::QuotaExceeded => "quota_exceeded",
            _ => "io",
        })
    }

    /// What went wrong with the disk, in the operator's words ("disk full"), for `/readyz`.
    pub fn disk_problem(&self) -> Option<String> {
        match self {
            InstallError::Io { source, .. } => Some(
                problem(source)
                    .map(str::to_owned)
                    .unwrap_or_else(|| source.to_string()),
            ),
            _ => None,
        }
    }
}

/// The disk conditions an operator fixes by hand, in their words.
fn problem(e: &std::io::Error) -> Option<&'static str> {
    match e.kind() {
        std::io::ErrorKind::StorageFull => Some("disk full"),
        std::io::ErrorKind::ReadOnlyFilesystem => Some("read-only file system"),
        std::io::ErrorKind::QuotaExceeded => Some("disk quota exceeded"),
        _ => None,
    }
}

/// An I/O error with the operator's words first and the system's after: "disk full (No space
/// left on device (os error 28))".
fn describe(e: &std::io::Error) -> String {
    match problem(e) {
        Some(p) => format!("{p} ({e})"),
        None => e.to_string(),
    }
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

impl Check {
    /// The check `[haproxy]` asks for.
    pub fn of(h: &HaproxyConfig) -> Check {
        Check {
            binary: h.binary.clone(),
            timeout: h.check_timeout,
            user: h.check_user.clone(),
        }
    }
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

/// The start of the names this process stages beside `dest`: `.<name>.haconfd-<pid>-`.
fn staged_prefix(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.haconfd-{}-", std::process::id())
}

/// Removes a file that was staged or set aside and will not be installed. One that cannot be
/// removed (the file system turned read-only under the install) is logged; a staged one is
/// removed by the next install beside the same `dest`.
pub fn discard(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            file = %path.display(),
            error = %describe(&e),
            "cannot remove a temporary file; it is left behind"
        ),
    }
}

/// Removes the files this process staged beside `dest` and could not remove then. Only its own
/// names: a staged file of another process may be in use, and one apply runs at a time, so no
/// install of this process is using one now.
fn sweep(dest: &Path) {
    let prefix = staged_prefix(dest);
    let Ok(entries) = fs::read_dir(parent(dest)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".tmp"));
        if ours && fs::remove_file(entry.path()).is_ok() {
            tracing::info!(file = %entry.path().display(), "removed a file an earlier install could not");
        }
    }
}

/// Writes `bytes` to a new 0600 file next to `dest`, fsynced. The caller removes it (with
/// [`discard`]); a failure here leaves nothing behind, or logs what it could not remove.
pub fn stage(dest: &Path, bytes: &[u8]) -> Result<PathBuf, InstallError> {
    let dir = parent(dest);
    fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
    for attempt in 0..16u32 {
        let staged = dest.with_file_name(format!("{}{attempt}.tmp", staged_prefix(dest)));
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // The errors name `dest`: its directory is what the operator frees or remounts.
            Err(e) => return Err(io("cannot create a staged copy of", dest)(e)),
        };
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        if let Err(e) = written {
            drop(f);
            discard(&staged);
            return Err(io("cannot write a staged copy of", dest)(e));
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

/// Stages `bytes` beside `dest` and proves the staged copy with `haproxy -c` when `check` is
/// given: the one way a file is written and then checked (an install, the installed file
/// before HAProxy boots on it, `haconfd check`). On success the caller owns the staged file;
/// on failure nothing staged is left.
pub async fn stage_checked(
    dest: &Path,
    bytes: &[u8],
    check: Option<&Check>,
) -> Result<PathBuf, InstallError> {
    let staged = stage(dest, bytes)?;
    if let Some(c) = check
        && let Err(e) = validate::check_as(&c.binary, &staged, c.timeout, c.user.as_deref()).await
    {
        discard(&staged);
        return Err(e.into());
    }
    Ok(staged)
}

/// Proves `bytes` as they would be installed at `dest` (a staged copy beside it, checked and
/// removed); `dest` itself is not touched.
pub async fn prove(dest: &Path, bytes: &[u8], check: &Check) -> Result<(), InstallError> {
    let staged = stage_checked(dest, bytes, Some(check)).await?;
    discard(&staged);
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably: staged (0600, fsynced), renamed over
/// it, the directory fsynced. For haconfd's own side files (the guard's counts, the server
/// state); a failure leaves the old file and nothing staged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let staged = stage(path, bytes)?;
    if let Err(e) = fs::rename(&staged, path) {
        discard(&staged);
        return Err(io("cannot rename the staged file over", path)(e));
    }
    sync_dir(parent(path))
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
    sweep(&t.dest);
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
    let staged = stage_checked(&t.dest, bytes, check).await?;
    let result = finish(t, &staged, current.as_deref());
    if result.is_err() {
        discard(&staged);
    }
    result.map(|()| Outcome::Installed { previous: current })
}

/// Puts a staged (and proven) file in place of `t.dest`, keeping `current` as `.prev`.
fn finish(t: &TemplateConfig, staged: &Path, current: Option<&[u8]>) -> Result<(), InstallError> {
    set_owner(staged, t)?;
    fs::set_permissions(staged, fs::Permissions::from_mode(t.mode))
        .map_err(io("cannot set the mode of the staged copy of", &t.dest))?;
    // The current file is set aside before the rename and named `.prev` only after it: a rename
    // that fails leaves `.prev` as it was, not a copy of a `dest` that never changed.
    let aside = match current {
        Some(prev) => Some(set_aside(&t.dest, prev)?),
        None => None,
    };
    if let Err(e) = fs::rename(staged, &t.dest) {
        if let Some(a) = &aside {
            discard(a);
        }
        return Err(io("cannot rename the staged file over", &t.dest)(e));
    }
    // From here on `dest` is the new, proven file: the install has happened and HAProxy must
    // take it, so what fails now is logged rather than failing an apply whose file is in place.
    if let Some(a) = aside {
        let target = prev_path(&t.dest);
        if let Err(e) = fs::rename(&a, &target) {
            discard(&a);
            tracing::warn!(
                file = %target.display(),
                error = %describe(&e),
                "cannot keep the previous file; the previous copy is stale"
            );
        }
    }
    if let Err(e) = sync_dir(parent(&t.dest)) {
        tracing::warn!(error = %e, "the new file is in place but not yet durable");
    }
    Ok(())
}

/// Keeps the file being replaced under a temporary name beside `dest`, for [`finish`] to name
/// `<dest>.prev` once the rename succeeded, so that an operator can go back to it.
fn set_aside(dest: &Path, prev: &[u8]) -> Result<PathBuf, InstallError> {
    // The installed file is the previous one: a hard link keeps it without writing or syncing
    // a byte (the directory fsync after the main rename covers the new name).
    let link = dest.with_file_name(format!("{}prev.tmp", staged_prefix(dest)));
    discard(&link);
    if fs::hard_link(dest, &link).is_ok() {
        return Ok(link);
    }
    stage(dest, prev).map_err(|e| match e {
        InstallError::Io { source, .. } => {
            io("cannot keep the previous file as", &prev_path(dest))(source)
        }
        e => e,
    })
}

/// Puts the previous file back after a failed reload: the reverse install, without a check (it
/// was proven when it was installed).
pub fn restore(t: &TemplateConfig, previous: Option<&[u8]>) -> Result<(), InstallError> {
    match previous {
        Some(bytes) => {
            let staged = stage(&t.dest, bytes)?;
            let put_back = fs::set_permissions(&staged, fs::Permissions::from_mode(t.mode))
                .map_err(io("cannot set the mode of the staged copy of", &t.dest))
                .and_then(|()| set_owner(&staged, t))
                .and_then(|()| fs::rename(&staged, &t.dest).map_err(io("cannot restore", &t.dest)));
            if put_back.is_err() {
                discard(&staged);
            }
            put_back?;
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
/// The private temporary directory of `haconfd check`: the maps it renders and the copies it
/// proves go here, never beside the live files. Removed on drop.
pub struct CheckDir {
    dir: tempfile::TempDir,
}

impl CheckDir {
    /// A new directory; with a `check_user`, one that user may pass through (0711) to reach the
    /// file it is handed.
    pub fn new(check_user: bool) -> std::io::Result<CheckDir> {
        let dir = tempfile::Builder::new()
            .prefix("haconfd-check-")
            .tempdir()?;
        if check_user {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(CheckDir { dir })
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a rendered map the checked file loads: readable by the check user, like the
    /// installed maps.
    pub fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
}
