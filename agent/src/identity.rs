//! The node's stable identity: a UUID kept in the state directory, so a restarted
//! agent is the same node to the orchestrator.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use uuid::Uuid;

/// File name of the node id inside the state directory.
pub const NODE_ID_FILE: &str = "node_id";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the state directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file exists but does not hold a node id. It is not replaced silently:
    /// a new id would make this node a stranger to the orchestrator.
    #[error("{path} does not hold a node id ({problem}); fix or remove it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Loads the node id from `state_dir`, or creates and stores a new one.
pub fn load_or_create(state_dir: &Path) -> Result<Uuid, IdentityError> {
    let path = state_dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            return parse(text.trim()).map_err(|problem| IdentityError::Corrupt { path, problem });
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(IdentityError::Io { path, source }),
    }
    let id = Uuid::new_v4();
    store(state_dir, &path, id).map_err(|source| IdentityError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(id)
}

fn parse(text: &str) -> Result<Uuid, String> {
    let id = Uuid::try_parse(text).map_err(|error| error.to_string())?;
    if id.is_nil() {
        return Err("the nil uuid".to_owned());
    }
    Ok(id)
}

/// Writes atomically (temporary file, fsync, rename) so a crash never leaves half an id.
fn store(state_dir: &Path, path: &Path, id: Uuid) -> io::Result<()> {
    fs::create_dir_all(state_dir)?;
    let temporary = state_dir.join(format!(".{NODE_ID_FILE}.tmp"));
    let mut file = fs::File::create(&temporary)?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_created_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("nested/state");
        let first = load_or_create(&state).unwrap();
        let second = load_or_create(&state).unwrap();
        assert_eq!(first, second);
        assert!(!first.is_nil());
    }

    #[test]
    fn a_corrupt_id_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(NODE_ID_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join(NODE_ID_FILE)).unwrap(),
            "garbage"
        );
    }
}
