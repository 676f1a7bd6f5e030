//! virtio-fs (virtio 1.2 section 5.11), the register side: device id 26, a high-priority queue
//! and one request queue, and a read-only config space holding the share's tag (what the guest
//! mounts: `mount -t virtiofs TAG DIR`) and the number of request queues. The queues are
//! served by the vhost-user backend ([`super::vhost_user`]), never by the VMM.

use super::{read_config_bytes, VirtioDevice};

pub const VIRTIO_ID_FS: u32 = 26;
/// The tag field's size in the config space; a shorter tag is NUL-padded.
pub const TAG_LEN: usize = 36;
/// The high-priority queue, then one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// What the guest may be offered of the backend's features: the ring features the backend
/// implements. Nothing the transport would have to take part in (packed rings, an IOMMU)
/// passes, whatever the backend says; VERSION_1 the transport adds itself.
const PASSED_FEATURES: u64 = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: use 1 to {TAG_LEN} characters from A-Z a-z 0-9 . _ -")]
    Tag(String),
}

/// Whether `tag` may name a share: 1 to [`TAG_LEN`] characters a mount command line and a
/// log line take as they are. The one rule for a tag.
pub fn is_tag(tag: &str) -> bool {
    (1..=TAG_LEN).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The register side of one share.
#[derive(Debug)]
pub struct Fs {
    /// The config space: the tag, NUL-padded, then `num_request_queues` (le32).
    config: [u8; TAG_LEN + 4],
    features: u64,
}

impl Fs {
    /// The device for the share tagged `tag`, offering what of `backend_features` may pass.
    pub fn new(tag: &str, backend_features: u64) -> Result<Fs, FsError> {
        if !is_tag(tag) {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        let request_queues = (QUEUE_SIZES.len() as u32 - 1).to_le_bytes();
        config[TAG_LEN..].copy_from_slice(&request_queues);
        Ok(Fs {
            config,
            features: backend_features & PASSED_FEATURES,
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_bytes(&self.config, offset, data)
    }

    /// The config space is read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_holds_the_padded_tag_and_one_request_queue_and_refuses_writes() {
        let mut fs = Fs::new("hostfs", u64::MAX).unwrap();
        let mut tag = [0xffu8; TAG_LEN];
        assert!(fs.read_config(0, &mut tag));
        assert_eq!(&tag[..6], b"hostfs");
        assert!(tag[6..].iter().all(|&b| b == 0));
        let mut queues = [0u8; 4];
        assert!(fs.read_config(TAG_LEN as u64, &mut queues));
        assert_eq!(u32::from_le_bytes(queues), 1);
        // Past the end, and any write, is refused.
        assert!(!fs.read_config(TAG_LEN as u64 + 1, &mut queues));
        assert!(!fs.write_config(0, b"x"));
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes().len(), 2);
        // Only the ring features pass, however much the backend offers.
        assert_eq!(fs.features(), PASSED_FEATURES);
    }

    #[test]
    fn a_tag_too_long_empty_or_with_other_characters_is_refused() {
        assert!(Fs::new(&"t".repeat(TAG_LEN), 0).is_ok());
        for bad in ["", "a b", "a/b", "tag\0", &"t".repeat(TAG_LEN + 1)] {
            assert_eq!(
                Fs::new(bad, 0).err(),
                Some(FsError::Tag(bad.to_string())),
                "{bad:?}"
            );
        }
    }
}
