//! The one way Trellis writes what must stay private (keys, bootstraps,
//! certificates with their keys): readable by the owner only, in
//! directories only the owner may enter, replaced atomically, and never
//! through a symlink planted where the file goes.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

/// Why a private file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct PrivateFileError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> PrivateFileError + '_ {
    move |source| PrivateFileError {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` and its missing parents, the ones created with mode 0700
/// (existing ones are left as they are: a mounted volume's root cannot be
/// changed by the pod).
pub fn create_dir(dir: &Path) -> Result<(), PrivateFileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(at(dir))
}

/// Makes sure `path` exists readable by its owner only, for a file another
/// library then opens itself (a database): created empty with mode 0600
/// if missing (exclusively, so a planted symlink is not followed), its
/// mode narrowed to 0600 if it exists.
pub fn create_file(path: &Path) -> Result<(), PrivateFileError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(at(path))?;
            }
            Ok(())
        }
        Err(error) => Err(at(path)(error)),
    }
}

/// Writes `contents` to `path` with mode 0600: into a new file beside it
/// (created exclusively, so a symlink there is not followed), synced, then
/// renamed over `path`, so a reader sees the old file or the new one,
/// never half of one.
pub fn write(path: &Path, contents: &[u8]) -> Result<(), PrivateFileError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let partial = path.with_file_name(format!(
        ".{}.{}.partial",
        name.as_deref().unwrap_or("file"),
        fastrand::u64(..)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = (|| {
        let mut file = options.open(&partial)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&partial, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&partial);
    }
    written.map_err(at(path))
}
