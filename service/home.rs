//! The home folder (`QUEUECTL_HOME`): where a server keeps its database, socket, token and log, and the checks
//! that keep other users out of it. Whoever owns the home, or can write into it, can read every job and make its
//! user run commands, so the server and the CLI both refuse a home, or a file in it, that is not the user's own.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub const SOCKET_FILE: &str = "queuectl.sock";
pub const TOKEN_FILE: &str = "token";
pub const ADDRESS_FILE: &str = "server.addr";
pub const LOG_FILE: &str = "server.log";
pub const LOCK_FILE: &str = "server.lock";
pub const SERVER_ID_FILE: &str = "server.id";
pub const DATABASE_FILE: &str = "jobs.db";

/// Every file a home may hold: what the server and the CLI check before they trust it.
#[cfg(unix)]
const FILES: [&str; 10] = [
    SOCKET_FILE,
    TOKEN_FILE,
    ADDRESS_FILE,
    LOG_FILE,
    LOCK_FILE,
    SERVER_ID_FILE,
    DATABASE_FILE,
    "jobs.db-wal",
    "jobs.db-shm",
    "jobs.db-journal",
];

/// A home, or a file in it, that this user must not use; the message says whose it is and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HomeError(String);

impl From<std::io::Error> for HomeError {
    fn from(error: std::io::Error) -> Self {
        HomeError(error.to_string())
    }
}

/// The default home: `$QUEUECTL_HOME`, else `~/.queuectl`.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("QUEUECTL_HOME").filter(|home| !home.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os(if cfg!(windows) { "USERPROFILE" } else { "HOME" })
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".queuectl")
}

/// Makes `home` ready for a server: creates it `0700` if it is missing, refuses it if another user owns it or
/// others can write to it, and takes away the read access a plain `mkdir` gives others (the folder to `0700`,
/// every file in it to `0600`).
pub fn prepare(home: &Path) -> Result<(), HomeError> {
    if !home.exists() {
        create_dir_private(home)
            .map_err(|error| HomeError(format!("cannot create {}: {error}", home.display())))?;
    }
    check(home)?;
    #[cfg(unix)]
    {
        tighten(home, 0o700)?;
        for name in FILES {
            let path = home.join(name);
            if path.exists() && name != SOCKET_FILE {
                tighten(&path, 0o600)?;
            }
        }
    }
    Ok(())
}

/// Checks a home a client is about to talk through: the folder and every file of it that exists must be this
/// user's, and the folder must not be writable by others. A missing home passes: there is nothing to trust yet.
pub fn check(home: &Path) -> Result<(), HomeError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(metadata) = fs::metadata(home) else {
            return Ok(());
        };
        check_owner(home, &metadata, "QUEUECTL_HOME")?;
        let mode = metadata.mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(HomeError(format!(
                "{} is writable by other users (mode {mode:o}), who could then run commands as you; \
                 run `chmod 700 {}`",
                home.display(),
                home.display()
            )));
        }
        for name in FILES {
            let path = home.join(name);
            if let Ok(metadata) = fs::symlink_metadata(&path) {
                check_owner(&path, &metadata, "the home")?;
            }
        }
    }
    #[cfg(windows)]
    let _ = home;
    Ok(())
}

#[cfg(unix)]
fn check_owner(path: &Path, metadata: &fs::Metadata, what: &str) -> Result<(), HomeError> {
    use std::os::unix::fs::MetadataExt;
    let me = current_uid();
    let owner = metadata.uid();
    if owner == me {
        return Ok(());
    }
    Err(HomeError(format!(
        "{} belongs to {}, not to you ({}): its owner could read your jobs or make you run theirs; use {what} \
         of your own (set QUEUECTL_HOME), or `chown -R {} {}` if it should be yours",
        path.display(),
        user_name(owner),
        user_name(me),
        me,
        path.display()
    )))
}

/// Removes the group and other permission bits of `path`, keeping the owner's.
#[cfg(unix)]
fn tighten(path: &Path, private: u32) -> Result<(), HomeError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let tightened = mode & private;
    fs::set_permissions(path, fs::Permissions::from_mode(tightened)).map_err(|error| {
        HomeError(format!(
            "{} can be read by other users (mode {mode:o}) and cannot be made private: {error}",
            path.display()
        ))
    })?;
    tracing::warn!(path = %path.display(), from = format!("{mode:o}"), to = format!("{tightened:o}"),
        "made a file of the home private: other users could read it");
    Ok(())
}

#[cfg(unix)]
fn current_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// `name (uid N)`, or `uid N` when the user database has no name for it.
#[cfg(unix)]
fn user_name(uid: u32) -> String {
    let mut buffer = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to overwrite.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to live memory of the sizes given; getpwuid_r writes the strings into `buffer`.
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() || entry.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: on success pw_name points at a NUL-terminated string inside `buffer`, which outlives this read.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    format!("{} (uid {uid})", name.to_string_lossy())
}

/// Creates `path` and its missing parents; the folder itself is `0700`.
pub fn create_dir_private(path: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Opens `path` for appending, creating it `0600` whatever the umask.
pub fn open_private(path: &Path) -> std::io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Creates `path`, which must not exist, empty and `0600`.
pub fn create_new_private(path: &Path) -> std::io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Writes `contents` to a file that only the owner can read.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, contents.as_bytes())
}

/// This machine's name, as `status` shows it.
pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Holds the home's lock for as long as it lives, so that one server owns one database.
pub fn lock(home: &Path) -> Result<File, HomeError> {
    let lock = open_private(&home.join(LOCK_FILE))?;
    // A CLI asking whether a server runs holds the lock shared for an instant: that is no server, so ask again.
    let mut tries = 1;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(fs::TryLockError::WouldBlock) if tries < LOCK_TRIES => {
                tries += 1;
                std::thread::sleep(LOCK_RETRY);
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(HomeError(format!(
                    "another queuectld already serves {}; stop it with `queuectl server stop`",
                    home.display()
                )));
            }
            Err(fs::TryLockError::Error(error)) => return Err(error.into()),
        }
    }
}

const LOCK_TRIES: u32 = 5;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// The home's server id, made once and kept, so that a restarted server recognises the jobs it was running.
pub fn server_id(home: &Path) -> Result<String, HomeError> {
    let path = home.join(SERVER_ID_FILE);
    if let Ok(id) = fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
    }
    let id = format!("{}-{}", host_name(), random_hex::<8>("the server id")?);
    write_private(&path, &id)?;
    Ok(id)
}

/// The bearer token TCP clients must present, created with 32 random bytes on first use.
pub fn load_or_create_token(home: &Path) -> Result<String, HomeError> {
    let path = home.join(TOKEN_FILE);
    if let Ok(token) = fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if token.len() >= 64 {
            return Ok(token);
        }
    }
    let token = random_hex::<32>("the token")?;
    write_private(&path, &token)?;
    Ok(token)
}

/// `N` random bytes in hex, for `what`.
fn random_hex<const N: usize>(what: &str) -> Result<String, HomeError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|error| HomeError(format!("no randomness for {what}: {error}")))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}
