//! Files that hold secrets (the store, ACL files, key and secret files, TLS keys) are
//! private to the platform's user: files 0600, folders 0700. New files get that from the
//! process umask (0077, also for the `valkey-server` children, which rewrite `users.acl` on
//! `ACL SAVE`); [`tighten`] and [`tighten_tree`] repair what an older install left open.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The umask that makes every new file 0600 and folder 0700.
pub const PRIVATE_UMASK: libc::mode_t = 0o077;

/// Sets this process's umask to [`PRIVATE_UMASK`] (inherited by its children).
pub fn private_umask() {
    // SAFETY: umask only changes the process's file mode creation mask.
    unsafe { libc::umask(PRIVATE_UMASK) };
}

/// Makes `path` 0700 (a folder) or 0600 (a file) if it is not already; a missing path and
/// symbolic links are left alone.
pub fn tighten(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let want = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

/// [`tighten`] on `root` and everything under it (not following symbolic links).
pub fn tighten_tree(root: &Path) -> std::io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        tighten(&path)?;
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn tighten_tree_makes_folders_0700_and_files_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("valkey/n0")).unwrap();
        std::fs::write(root.join("valkey/n0/users.acl"), "user x").unwrap();
        std::fs::write(root.join("shoal.db"), "").unwrap();
        for (p, m) in [
            ("", 0o755),
            ("valkey", 0o755),
            ("valkey/n0", 0o775),
            ("valkey/n0/users.acl", 0o644),
            ("shoal.db", 0o666),
        ] {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap();
        }
        tighten_tree(&root).unwrap();
        for d in ["", "valkey", "valkey/n0"] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d}");
        }
        for f in ["valkey/n0/users.acl", "shoal.db"] {
            assert_eq!(mode(&root.join(f)), 0o600, "{f}");
        }
        tighten(&root.join("missing")).unwrap();
    }
}
