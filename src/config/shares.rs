//! Host directories shared with the guest over virtio-fs: `--share DIR:TAG[,ro|,rw]` or the
//! JSON `shares` list. Only their shape is checked here (this module opens nothing); the
//! supervisor checks each directory on the host before it starts the share's virtiofsd.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// The virtio-fs tag field's size: a longer tag can not be told to the guest.
pub const MAX_TAG_LEN: usize = 36;

/// Whether `tag` may name a share (what the guest mounts: `mount -t virtiofs TAG DIR`): 1 to
/// [`MAX_TAG_LEN`] characters that a mount command line and a log line take as they are. The
/// one rule for a tag; the device refuses any other too.
pub fn is_share_tag(tag: &str) -> bool {
    super::id_chars_ok(tag, MAX_TAG_LEN)
}

/// A share as given. Read-only unless `read_write` is asked for.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawShare {
    pub path: PathBuf,
    pub tag: String,
    #[serde(default)]
    pub read_write: bool,
}

impl std::str::FromStr for RawShare {
    type Err = ConfigError;

    /// `DIR:TAG[,ro|,rw]`. The tag is what follows the last `:` before the options, so a
    /// directory name may hold a `:`; it may not hold a `,`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Share(s.to_string());
        let mut parts = s.split(',');
        let (path, tag) = parts
            .next()
            .and_then(|p| p.rsplit_once(':'))
            .filter(|(path, _)| !path.is_empty())
            .ok_or_else(bad)?;
        let mut mode = None;
        for part in parts {
            match (part, mode) {
                ("ro", None) => mode = Some(false),
                ("rw", None) => mode = Some(true),
                _ => return Err(bad()),
            }
        }
        Ok(RawShare {
            path: PathBuf::from(path),
            tag: tag.to_string(),
            read_write: mode.unwrap_or(false),
        })
    }
}

/// A share whose shape was checked: a tag the guest can mount, unique in the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory, as given; the supervisor resolves and checks it.
    pub path: PathBuf,
    pub tag: String,
    /// The guest may change files (`rw`); otherwise the backend refuses every write.
    pub writable: bool,
}

pub(super) fn validate_shares(raw: Vec<RawShare>) -> Result<Vec<ShareConfig>, ConfigError> {
    let mut shares: Vec<ShareConfig> = Vec::with_capacity(raw.len());
    for share in raw {
        if !is_share_tag(&share.tag) {
            return Err(ConfigError::ShareTag(share.tag));
        }
        if shares.iter().any(|s| s.tag == share.tag) {
            return Err(ConfigError::DuplicateShareTag(share.tag));
        }
        if share.path.as_os_str().is_empty() {
            return Err(ConfigError::Share(format!(":{}", share.tag)));
        }
        shares.push(ShareConfig {
            path: share.path,
            tag: share.tag,
            writable: share.read_write,
        });
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RawShare, ConfigError> {
        s.parse()
    }

    #[test]
    fn share_flags_are_dir_colon_tag_read_only_unless_rw_is_asked_for() {
        let share = parse("/srv/data:data").unwrap();
        assert_eq!(share.path, PathBuf::from("/srv/data"));
        assert_eq!(share.tag, "data");
        assert!(!share.read_write);
        assert!(!parse("/srv/data:data,ro").unwrap().read_write);
        assert!(parse("/srv/data:data,rw").unwrap().read_write);
        // A colon in the directory's name: the tag is after the last one.
        assert_eq!(parse("/a:b:tag").unwrap().path, PathBuf::from("/a:b"));
        for bad in [
            "/srv/data",
            ":tag",
            "/d:t,rw,ro",
            "/d:t,rw,rw",
            "/d:t,writable",
            "",
        ] {
            assert_eq!(
                parse(bad),
                Err(ConfigError::Share(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn share_tags_must_fit_the_device_and_be_unique() {
        let share = |tag: &str| RawShare {
            path: PathBuf::from("/srv"),
            tag: tag.to_string(),
            read_write: false,
        };
        let long = "t".repeat(MAX_TAG_LEN);
        assert_eq!(validate_shares(vec![share(&long)]).unwrap()[0].tag, long);
        let too_long = "t".repeat(MAX_TAG_LEN + 1);
        for bad in ["", "a b", "a/b", too_long.as_str()] {
            assert_eq!(
                validate_shares(vec![share(bad)]),
                Err(ConfigError::ShareTag(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            validate_shares(vec![share("x"), share("x")]),
            Err(ConfigError::DuplicateShareTag("x".to_string()))
        );
    }
}
