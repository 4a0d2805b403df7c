//! Settings from a directory of files, one per variable: the shape of a
//! ConfigMap mounted as a volume.
//!
//! Why not `envFrom`: the kubelet resolves `envFrom` and `configMapKeyRef`
//! each time it (re)starts a container, through the API server. While the
//! API server is away that fails (`CreateContainerConfigError: failed to
//! sync configmap cache`), so an agent that crashed then stayed down until
//! the API server came back. A mounted ConfigMap keeps its last contents.

use std::path::Path;

/// The directory is named by this variable; it is read before flags are
/// parsed, so it cannot itself be a flag.
pub const SETTINGS_DIR_ENV: &str = "WEIR_SETTINGS_DIR";

/// The `WEIR_*` variables the directory holds, as (name, value). The
/// kubelet's `..data` links and anything not named `WEIR_*` are skipped;
/// values are trimmed, as a file's trailing newline is not part of a value.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("WEIR_") || !entry.path().is_file() {
            continue;
        }
        out.push((name, std::fs::read_to_string(entry.path())?.trim().to_string()));
    }
    out.sort();
    Ok(out)
}

/// Sets each variable of `$WEIR_SETTINGS_DIR` that the environment does not
/// already set (the environment wins, so a pod's own `env:` overrides the
/// shared ConfigMap). Must run before any thread starts.
pub fn load_from_env_dir() -> Result<(), String> {
    let Some(dir) = std::env::var_os(SETTINGS_DIR_ENV) else { return Ok(()) };
    let vars =
        read_dir(Path::new(&dir)).map_err(|e| format!("{SETTINGS_DIR_ENV}={}: {e}", Path::new(&dir).display()))?;
    for (name, value) in vars {
        if std::env::var_os(&name).is_none() {
            set_env(&name, &value);
        }
    }
    Ok(())
}

#[allow(unsafe_code)]
fn set_env(name: &str, value: &str) {
    // SAFETY: called from main before any other thread exists, so nothing
    // reads the environment concurrently.
    unsafe { std::env::set_var(name, value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_weir_files_and_skips_the_rest() {
        let dir = std::env::temp_dir().join(format!("weir-settings-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..2026_12_01")).unwrap();
        std::fs::write(dir.join("WEIR_MODE"), "on-demand\n").unwrap();
        std::fs::write(dir.join("WEIR_VNI"), "7").unwrap();
        std::fs::write(dir.join("OTHER"), "x").unwrap();
        let vars = read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(vars, vec![("WEIR_MODE".into(), "on-demand".into()), ("WEIR_VNI".into(), "7".into())]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let err = read_dir(Path::new("/nonexistent/weir")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
