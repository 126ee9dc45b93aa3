//! Writing files that hold a token: the Secret manifest replaced atomically (temp file, fsync,
//! rename), or, when that is impossible, the token alone in a new 0600 file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// Saves the token to a new 0600 file next to the Secret file, or in the temp directory.
pub(super) fn save_token_file(
    path: &Path,
    secret_name: &str,
    token: &SecretString,
) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let file_name = format!("{secret_name}.refresh_token.{stamp}.new");
    let mut candidates = Vec::new();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        candidates.push(dir.join(&file_name));
    } else {
        candidates.push(PathBuf::from(&file_name));
    }
    candidates.push(std::env::temp_dir().join(&file_name));
    let mut last_error = None;
    for candidate in candidates {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&candidate) {
            Ok(mut file) => {
                file.write_all(token.expose_secret().as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                return Ok(candidate);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no place to save the token")))
}

/// Replaces `path` atomically: a temp file in the same directory (same permissions), fsync, rename.
pub(super) fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    // Write through symlinks to the real file (falls back to the path itself).
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{nanos}", std::process::id()));
    let permissions = std::fs::metadata(&target).map(|m| m.permissions()).ok();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)?;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &target)?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
