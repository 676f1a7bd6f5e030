//! Reading a settings file the operator names (`bulkhead run --config`, the Firecracker
//! personality's `--config-file`, `bulkhead serve --config`): a regular file only, opened
//! without blocking (a FIFO must not hang start-up), and no larger than a settings file can
//! sensibly be.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The largest settings file bulkhead reads: far beyond any real one.
pub const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// Reads the settings file at `path`; the error names the file and what is wrong with it.
pub fn read_settings(path: &Path) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("cannot read config file {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(fail)?;
    let meta = f.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(format!(
            "config file {}: not a regular file",
            path.display()
        ));
    }
    if meta.len() > MAX_SETTINGS_BYTES {
        return Err(format!(
            "config file {}: {} bytes, more than the {MAX_SETTINGS_BYTES} a settings file may have",
            path.display(),
            meta.len()
        ));
    }
    let mut text = String::new();
    // A file that grows while it is read stops at the limit, and fails to parse.
    f.by_ref()
        .take(MAX_SETTINGS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_of_sane_size_is_read() {
        let dir = std::env::temp_dir().join(format!("bulkhead-hostfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(read_settings(&small).unwrap(), "{}");
        let big = dir.join("big.json");
        std::fs::write(&big, vec![b' '; MAX_SETTINGS_BYTES as usize + 1]).unwrap();
        assert!(read_settings(&big).unwrap_err().contains("more than"));
        assert!(read_settings(&dir)
            .unwrap_err()
            .contains("not a regular file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
