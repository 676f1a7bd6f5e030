//! The virtio-vsock packet header (virtio 1.2 section 5.10.6), parsed strictly.

/// struct virtio_vsock_hdr.
pub const HEADER_LEN: usize = 44;
pub const TYPE_STREAM: u16 = 1;
pub const HOST_CID: u64 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub op: Op,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a guest's packet header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than 44 bytes.
    Short,
    /// A socket type other than stream, or an unknown operation.
    Unknown,
    /// The source is not the guest's own CID, or the destination is not the host.
    WrongCid,
    /// `len` disagrees with the payload, or a non-RW packet carries one.
    BadLength,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        v.copy_from_slice(src);
    }
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        v.copy_from_slice(src);
    }
    u64::from_le_bytes(v)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(src) = b.get(at..at + 2) {
        v.copy_from_slice(src);
    }
    u16::from_le_bytes(v)
}

impl Header {
    /// Parses a packet the guest sent: `bytes` is the header, `payload` how many bytes follow
    /// it in the chain. The guest may only speak as `guest_cid` and only to the host.
    pub fn parse(bytes: &[u8], payload: u64, guest_cid: u64) -> Result<Header, HeaderError> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Short);
        }
        let kind = le_u16(bytes, 28);
        let op = Op::from_u16(le_u16(bytes, 30)).ok_or(HeaderError::Unknown)?;
        if kind != TYPE_STREAM {
            return Err(HeaderError::Unknown);
        }
        let h = Header {
            src_cid: le_u64(bytes, 0),
            dst_cid: le_u64(bytes, 8),
            src_port: le_u32(bytes, 16),
            dst_port: le_u32(bytes, 20),
            len: le_u32(bytes, 24),
            op,
            flags: le_u32(bytes, 32),
            buf_alloc: le_u32(bytes, 36),
            fwd_cnt: le_u32(bytes, 40),
        };
        if h.src_cid != guest_cid || h.dst_cid != HOST_CID {
            return Err(HeaderError::WrongCid);
        }
        let expected = if op == Op::Rw { payload } else { 0 };
        if u64::from(h.len) != expected || (op == Op::Rw && h.len == 0) {
            return Err(HeaderError::BadLength);
        }
        Ok(h)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let fields: [(usize, &[u8]); 10] = [
            (0, &self.src_cid.to_le_bytes()),
            (8, &self.dst_cid.to_le_bytes()),
            (16, &self.src_port.to_le_bytes()),
            (20, &self.dst_port.to_le_bytes()),
            (24, &self.len.to_le_bytes()),
            (28, &TYPE_STREAM.to_le_bytes()),
            (30, &(self.op as u16).to_le_bytes()),
            (32, &self.flags.to_le_bytes()),
            (36, &self.buf_alloc.to_le_bytes()),
            (40, &self.fwd_cnt.to_le_bytes()),
        ];
        for (at, v) in fields {
            if let Some(dst) = b.get_mut(at..at + v.len()) {
                dst.copy_from_slice(v);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: Op, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn a_header_survives_encode_and_parse() {
        let h = hdr(Op::Rw, 10);
        assert_eq!(Header::parse(&h.encode(), 10, 3), Ok(h));
    }

    #[test]
    fn headers_that_lie_about_themselves_are_refused() {
        assert_eq!(Header::parse(&[0; 43], 0, 3), Err(HeaderError::Short));
        let mut bad_op = hdr(Op::Request, 0).encode();
        bad_op[30] = 9;
        assert_eq!(Header::parse(&bad_op, 0, 3), Err(HeaderError::Unknown));
        let mut dgram = hdr(Op::Request, 0).encode();
        dgram[28] = 3;
        assert_eq!(Header::parse(&dgram, 0, 3), Err(HeaderError::Unknown));
        let spoofed = hdr(Op::Request, 0).encode();
        assert_eq!(Header::parse(&spoofed, 0, 4), Err(HeaderError::WrongCid));
        let mut to_other_vm = hdr(Op::Request, 0);
        to_other_vm.dst_cid = 5;
        assert_eq!(
            Header::parse(&to_other_vm.encode(), 0, 3),
            Err(HeaderError::WrongCid)
        );
        assert_eq!(
            Header::parse(&hdr(Op::Rw, 10).encode(), 9, 3),
            Err(HeaderError::BadLength)
        );
        assert_eq!(
            Header::parse(&hdr(Op::Rw, 0).encode(), 0, 3),
            Err(HeaderError::BadLength)
        );
        assert_eq!(
            Header::parse(&hdr(Op::Request, 4).encode(), 4, 3),
            Err(HeaderError::BadLength)
        );
    }
}
