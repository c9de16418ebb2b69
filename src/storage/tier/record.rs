//! The cold tier's record format: one zstd-compressed extent, self-describing and checksummed.
//!
//! ```text
//! offset size field
//!      0    4 magic "NCXR"
//!      4    1 format version (1)
//!      5    3 reserved, zero
//!      8    8 extent number (little-endian)
//!     16    8 generation of the extent when it was compressed
//!     24    4 uncompressed length (the extent size, or less for a short last extent)
//!     28    4 compressed length (bytes following the header)
//!     32    4 CRC32C of the compressed bytes
//!     36    4 CRC32C of bytes 0..36
//!     40    … the zstd frame
//! ```
//!
//! Decoding trusts nothing it reads: magic, version, reserved bytes and both checksums must
//! match, the record must belong to the extent and generation the map expects, the lengths must
//! fit the caller's bounds, and decompression writes into a buffer of exactly the recorded
//! uncompressed length (a frame that would produce more, or less, is refused). Memory stays
//! bounded by the extent size whatever the record claims.

// Data read from disk is as untrusted as a guest's: no indexing or arithmetic that can panic.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Bytes before the compressed data.
pub const HEADER_LEN: usize = 40;
const MAGIC: [u8; 4] = *b"NCXR";
const VERSION: u8 = 1;

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header, or than the header says follow it.
    #[error("record truncated")]
    Truncated,
    /// Not a record of ours (magic or version).
    #[error("not a cold record (magic/version)")]
    BadMagic,
    /// The header checksum does not match (bit flip, torn write).
    #[error("record header checksum mismatch")]
    HeaderChecksum,
    /// The data checksum does not match.
    #[error("record data checksum mismatch")]
    DataChecksum,
    /// The record is for another extent or generation than the map says.
    #[error("record is for extent {extent} generation {generation}, expected {expected_extent}/{expected_generation}")]
    WrongExtent {
        /// What the record says.
        extent: u64,
        /// What the record says.
        generation: u64,
        /// What the map says.
        expected_extent: u64,
        /// What the map says.
        expected_generation: u64,
    },
    /// A length outside the caller's bounds.
    #[error("record length {0} out of bounds")]
    BadLength(u64),
    /// zstd refused the frame or it did not decompress to the recorded length.
    #[error("record does not decompress to its recorded length")]
    Decompress,
    /// Compression failed (only on encode).
    #[error("compression failed: {0}")]
    Compress(String),
}

/// What a record says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Extent number.
    pub extent: u64,
    /// Extent generation when compressed.
    pub generation: u64,
    /// Uncompressed length.
    pub raw_len: u32,
    /// Compressed length.
    pub comp_len: u32,
    data_crc: u32,
}

impl RecordHeader {
    /// Bytes of the whole record.
    pub fn record_len(&self) -> u64 {
        (HEADER_LEN as u64).saturating_add(u64::from(self.comp_len))
    }
}

/// Compresses `data` (one extent) into a record at zstd `level`.
pub fn encode(
    extent: u64,
    generation: u64,
    data: &[u8],
    level: i32,
) -> Result<Vec<u8>, RecordError> {
    let raw_len =
        u32::try_from(data.len()).map_err(|_| RecordError::BadLength(data.len() as u64))?;
    let compressed =
        zstd::bulk::compress(data, level).map_err(|e| RecordError::Compress(e.to_string()))?;
    let comp_len = u32::try_from(compressed.len())
        .map_err(|_| RecordError::BadLength(compressed.len() as u64))?;
    let mut out = Vec::with_capacity(HEADER_LEN.saturating_add(compressed.len()));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&extent.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&comp_len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&compressed).to_le_bytes());
    let header_crc = crc32c::crc32c(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

fn word<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], RecordError> {
    bytes
        .get(at..at.saturating_add(N))
        .and_then(|b| b.try_into().ok())
        .ok_or(RecordError::Truncated)
}

/// Parses and checks a record header (first [`HEADER_LEN`] bytes), refusing records whose
/// uncompressed length exceeds `max_raw_len` or whose compressed length exceeds
/// `max_comp_len`.
pub fn parse_header(
    bytes: &[u8],
    max_raw_len: u32,
    max_comp_len: u32,
) -> Result<RecordHeader, RecordError> {
    let header = bytes.get(..HEADER_LEN).ok_or(RecordError::Truncated)?;
    if word::<4>(header, 0)? != MAGIC || word::<1>(header, 4)? != [VERSION] {
        return Err(RecordError::BadMagic);
    }
    let stored_crc = u32::from_le_bytes(word(header, 36)?);
    if crc32c::crc32c(header.get(..36).ok_or(RecordError::Truncated)?) != stored_crc {
        return Err(RecordError::HeaderChecksum);
    }
    if word::<3>(header, 5)? != [0; 3] {
        return Err(RecordError::BadMagic);
    }
    let parsed = RecordHeader {
        extent: u64::from_le_bytes(word(header, 8)?),
        generation: u64::from_le_bytes(word(header, 16)?),
        raw_len: u32::from_le_bytes(word(header, 24)?),
        comp_len: u32::from_le_bytes(word(header, 28)?),
        data_crc: u32::from_le_bytes(word(header, 32)?),
    };
    if parsed.raw_len > max_raw_len {
        return Err(RecordError::BadLength(u64::from(parsed.raw_len)));
    }
    if parsed.comp_len > max_comp_len {
        return Err(RecordError::BadLength(u64::from(parsed.comp_len)));
    }
    Ok(parsed)
}

/// Largest compressed size zstd may produce for `raw_len` bytes (a record claiming more is
/// corrupt).
pub fn max_compressed_len(raw_len: u32) -> u32 {
    u32::try_from(zstd::zstd_safe::compress_bound(raw_len as usize)).unwrap_or(u32::MAX)
}

/// Checks the record in `bytes` (header and data) against the extent and generation the map
/// expects and decompresses it into `out` (resized to the recorded length, at most
/// `max_raw_len`).
pub fn decode_into(
    bytes: &[u8],
    extent: u64,
    generation: u64,
    max_raw_len: u32,
    out: &mut Vec<u8>,
) -> Result<RecordHeader, RecordError> {
    let header = parse_header(bytes, max_raw_len, max_compressed_len(max_raw_len))?;
    if header.extent != extent || header.generation != generation {
        return Err(RecordError::WrongExtent {
            extent: header.extent,
            generation: header.generation,
            expected_extent: extent,
            expected_generation: generation,
        });
    }
    let end = HEADER_LEN.saturating_add(header.comp_len as usize);
    let data = bytes.get(HEADER_LEN..end).ok_or(RecordError::Truncated)?;
    if crc32c::crc32c(data) != header.data_crc {
        return Err(RecordError::DataChecksum);
    }
    out.clear();
    out.resize(header.raw_len as usize, 0);
    let n = zstd::bulk::decompress_to_buffer(data, out.as_mut_slice())
        .map_err(|_| RecordError::Decompress)?;
    if n != header.raw_len as usize {
        return Err(RecordError::Decompress);
    }
    Ok(header)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    const EXTENT: u32 = 64 << 10;

    fn text_extent() -> Vec<u8> {
        let line = b"the quick brown fox jumps over the lazy dog 0123456789\n";
        line.iter().cycle().take(EXTENT as usize).copied().collect()
    }

    #[test]
    fn round_trip_compresses_text_and_checks_identity() {
        let data = text_extent();
        let record = encode(7, 3, &data, 3).unwrap();
        assert!(
            record.len() < data.len() / 20,
            "text compresses: {}",
            record.len()
        );
        let mut out = Vec::new();
        let header = decode_into(&record, 7, 3, EXTENT, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(header.record_len(), record.len() as u64);
        assert!(matches!(
            decode_into(&record, 8, 3, EXTENT, &mut out),
            Err(RecordError::WrongExtent { .. })
        ));
        assert!(matches!(
            decode_into(&record, 7, 4, EXTENT, &mut out),
            Err(RecordError::WrongExtent { .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let data = text_extent();
        let record = encode(1, 1, &data, 3).unwrap();
        let mut out = Vec::new();
        for byte in 0..record.len() {
            for bit in 0..8 {
                let mut bad = record.clone();
                bad[byte] ^= 1 << bit;
                let result = decode_into(&bad, 1, 1, EXTENT, &mut out);
                assert!(
                    result.is_err(),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_and_lying_lengths_are_refused_with_bounded_memory() {
        let data = text_extent();
        let record = encode(2, 9, &data, 3).unwrap();
        let mut out = Vec::new();
        for len in [0, 10, HEADER_LEN - 1, HEADER_LEN, record.len() - 1] {
            assert!(
                decode_into(&record[..len], 2, 9, EXTENT, &mut out).is_err(),
                "len {len}"
            );
        }
        // A header (with a valid checksum) claiming a 4 GiB extent is refused before any
        // allocation; so is one claiming more compressed bytes than zstd could ever produce.
        for (at, value) in [(24, u32::MAX), (28, u32::MAX)] {
            let mut bad = record.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let crc = crc32c::crc32c(&bad[..36]);
            bad[36..40].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                decode_into(&bad, 2, 9, EXTENT, &mut out),
                Err(RecordError::BadLength(_))
            ));
            assert!(out.capacity() <= EXTENT as usize);
        }
        // A frame that decompresses to less than recorded (header rewritten consistently).
        let mut short = record.clone();
        short[24..28].copy_from_slice(&(EXTENT - 1).to_le_bytes());
        let crc = crc32c::crc32c(&short[..36]);
        short[36..40].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_into(&short, 2, 9, EXTENT, &mut out).unwrap_err(),
            RecordError::Decompress
        );
    }
}
