//! A directory of Kubernetes manifests (`*.yaml`, `*.yml`, `*.json`,
//! multi-document files allowed, subdirectories included), watched.
//!
//! Any change under the directory triggers a rescan; only files whose bytes
//! changed are parsed again. A file that no longer parses keeps its last
//! good objects (bad input never takes good config down) and is reported;
//! a deleted file's objects are deleted.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Change, Source, SourceError, SourceUpdate};
use crate::{
    catalog::Problem,
    kinds::{KindError, Object, ObjectRef},
};

/// Reads and watches a directory of manifests.
#[derive(Debug)]
pub struct FileSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Which files define each object; the last one (in path order) applies.
    owners: BTreeMap<ObjectRef, BTreeSet<PathBuf>>,
}

#[derive(Debug, Default)]
struct FileState {
    hash: u64,
    objects: BTreeMap<ObjectRef, Object>,
    problems: Vec<Problem>,
}

impl FileSource {
    /// A source over `root`.
    pub fn new(root: impl Into<PathBuf>) -> FileSource {
        FileSource {
            root: root.into(),
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }

    /// Rescans the directory; returns the changes since the last scan, and
    /// the problems of every file now.
    pub fn scan(&mut self) -> Result<SourceUpdate, SourceError> {
        let mut touched: BTreeSet<ObjectRef> = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let listing = manifest_files(&self.root)?;
        // Files under a directory that could not be listed keep their
        // objects: unreadable is not deleted.
        seen.extend(
            (self.files.keys())
                .filter(|f| listing.unreadable.iter().any(|(dir, _)| f.starts_with(dir)))
                .cloned(),
        );
        for path in listing.files {
            let shown = path
                .strip_prefix(&self.root)
                .unwrap_or(&path)
                .display()
                .to_string();
            seen.insert(path.clone());
            let state = self.files.entry(path.clone()).or_default();
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    // Gone since it was listed, or unreadable: its last good
                    // objects stay until a rescan no longer lists it.
                    warn!(file = %shown, %error, "keeping the file's last good objects");
                    state.hash = 0;
                    state.problems = vec![Problem {
                        object: shown,
                        reason: format!("cannot be read: {error}"),
                        kind: crate::catalog::ProblemKind::Invalid,
                    }];
                    continue;
                }
            };
            let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
            if state.hash == hash && hash != 0 {
                continue;
            }
            state.hash = hash;
            match parse(&shown, &bytes) {
                Ok((objects, problems)) => {
                    let old = std::mem::replace(&mut state.objects, objects);
                    state.problems = problems;
                    let new_refs: Vec<ObjectRef> = state.objects.keys().cloned().collect();
                    for r in old.into_keys() {
                        disown(&mut self.owners, &r, &path);
                        touched.insert(r);
                    }
                    for r in new_refs {
                        self.owners
                            .entry(r.clone())
                            .or_default()
                            .insert(path.clone());
                        touched.insert(r);
                    }
                }
                Err(problem) => {
                    warn!(file = %shown, reason = %problem.reason, "keeping the file's last good objects");
                    state.problems = vec![problem];
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                for r in state.objects.into_keys() {
                    disown(&mut self.owners, &r, &path);
                    touched.insert(r);
                }
            }
        }
        // Each touched object is now whatever the last file defining it says,
        // or deleted if no file does.
        let changes = touched
            .into_iter()
            .map(|r| {
                let object = self
                    .owners
                    .get(&r)
                    .and_then(|owners| owners.last())
                    .and_then(|path| self.files.get(path)?.objects.get(&r));
                match object {
                    Some(object) => Change::Apply(Box::new(object.clone())),
                    None => Change::Delete(r),
                }
            })
            .collect();
        Ok(SourceUpdate {
            changes,
            problems: self.problems(&listing.unreadable),
        })
    }

    fn problems(&self, unreadable: &[(PathBuf, std::io::Error)]) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .files
            .values()
            .flat_map(|s| s.problems.iter().cloned())
            .collect();
        problems.extend(unreadable.iter().map(|(dir, error)| {
            Problem {
                object: dir
                    .strip_prefix(&self.root)
                    .unwrap_or(dir)
                    .display()
                    .to_string(),
                reason: format!(
                    "cannot list this directory ({error}); its files keep their objects"
                ),
                kind: crate::catalog::ProblemKind::Invalid,
            }
        }));
        for (r, owners) in self.owners.iter().filter(|(_, o)| o.len() > 1) {
            let files: Vec<String> = owners
                .iter()
                .map(|p| {
                    p.strip_prefix(&self.root)
                        .unwrap_or(p)
                        .display()
                        .to_string()
                })
                .collect();
            problems.push(Problem {
                object: r.to_string(),
                reason: format!(
                    "defined in several files ({}); the last one applies",
                    files.join(", ")
                ),
                kind: crate::catalog::ProblemKind::Invalid,
            });
        }
        problems.sort();
        problems
    }
}

fn disown(owners: &mut BTreeMap<ObjectRef, BTreeSet<PathBuf>>, r: &ObjectRef, path: &Path) {
    if let Some(files) = owners.get_mut(r) {
        files.remove(path);
        if files.is_empty() {
            owners.remove(r);
        }
    }
}

impl Source for FileSource {
    async fn run(mut self, updates: mpsc::Sender<SourceUpdate>) -> Result<(), SourceError> {
        let (wake, mut woken) = mpsc::channel::<()>(1);
        let root = self.root.display().to_string();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading the files raises access events; only changes matter.
                let changed = event
                    .is_ok_and(|e| e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove());
                if changed {
                    // A full channel already holds a pending rescan.
                    let _ = wake.try_send(());
                }
            })
            .map_err(|source| SourceError::Watch {
                path: root.clone(),
                source,
            })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|source| SourceError::Watch { path: root, source })?;
        let first = self.scan()?;
        info!(dir = %self.root.display(), objects = first.changes.len(), "manifests read");
        if updates.send(first).await.is_err() {
            return Ok(());
        }
        while woken.recv().await.is_some() {
            // Editors write in several steps; let them finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while woken.try_recv().is_ok() {}
            let update = self.scan()?;
            if update.changes.is_empty() {
                debug!("rescan found no change");
            }
            if updates.send(update).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The manifest files below a root, and the directories below it that
/// could not be listed.
struct Listing {
    files: Vec<PathBuf>,
    unreadable: Vec<(PathBuf, std::io::Error)>,
}

/// Lists the manifests below `root`, following symbolic links (a
/// ConfigMap volume is made of them) but visiting each directory once, so
/// a link to an ancestor cannot loop. Only an unreadable root is an error.
fn manifest_files(root: &Path) -> Result<Listing, SourceError> {
    let mut listing = Listing {
        files: Vec::new(),
        unreadable: Vec::new(),
    };
    let mut visited = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let canonical = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !visited.insert(canonical) {
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(source) if dir == root => {
                return Err(SourceError::Read {
                    path: dir.display().to_string(),
                    source,
                })
            }
            Err(error) => {
                listing.unreadable.push((dir, error));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                listing.files.push(path);
            }
        }
    }
    listing.files.sort();
    Ok(listing)
}

/// Parses one file. `Err` when the file as a whole is unreadable YAML; else
/// its objects and the documents it had to skip.
fn parse(file: &str, bytes: &[u8]) -> Result<(BTreeMap<ObjectRef, Object>, Vec<Problem>), Problem> {
    let text = std::str::from_utf8(bytes).map_err(|e| Problem {
        object: file.to_owned(),
        reason: format!("not UTF-8: {e}"),
        kind: crate::catalog::ProblemKind::Invalid,
    })?;
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| Problem {
            object: file.to_owned(),
            reason: format!("YAML does not parse: {e}"),
            kind: crate::catalog::ProblemKind::Invalid,
        })?;
    let mut objects = BTreeMap::new();
    let mut problems = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        match Object::from_manifest(document) {
            Ok(object) => {
                objects.insert(object.object_ref(), object);
            }
            Err(KindError::Unsupported { api_version, kind }) => {
                debug!(%file, document = index + 1, %api_version, %kind, "not a kind Trellis reads");
            }
            Err(error) => problems.push(Problem {
                object: format!("{file} (document {})", index + 1),
                reason: error.to_string(),
                kind: crate::catalog::ProblemKind::Invalid,
            }),
        }
    }
    Ok((objects, problems))
}
