//! Confluent's wire format, both directions: a zero magic byte, the writer schema's registry id
//! as a big-endian u32, then one Avro binary datum. Lengths are checked before anything is
//! sliced, so a short or foreign payload is an error value, never a panic.

/// The first byte of every Confluent-framed payload.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// Why a payload is not a Confluent frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No value at all (a tombstone).
    #[error("record has no value")]
    Missing,
    /// Fewer bytes than the header.
    #[error("payload is {0} bytes, shorter than the 5-byte Confluent header")]
    TooShort(usize),
    /// The first byte is not the magic byte.
    #[error("first byte is 0x{0:02x}, not the Confluent magic byte 0x00")]
    BadMagic(u8),
}

/// Splits a payload into the writer schema id and the Avro datum.
///
/// ```
/// use kscore::wire::{parse, FrameError};
///
/// assert_eq!(parse(Some(&[0, 0, 0, 0, 42, 2, 4])), Ok((42, &[2u8, 4][..])));
/// assert_eq!(parse(Some(b"{}")), Err(FrameError::TooShort(2)));
/// ```
pub fn parse(payload: Option<&[u8]>) -> Result<(u32, &[u8]), FrameError> {
    let payload = payload.ok_or(FrameError::Missing)?;
    let (header, datum) = match payload.split_first_chunk::<HEADER_LEN>() {
        Some(split) => split,
        None => return Err(FrameError::TooShort(payload.len())),
    };
    let [magic, id @ ..] = *header;
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    Ok((u32::from_be_bytes(id), datum))
}

/// Writes the header for `schema_id` into `out`; the caller appends the datum.
pub fn write_header(out: &mut Vec<u8>, schema_id: u32) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_header(&mut buf, 0x0102_0304);
        buf.extend_from_slice(&[9, 8]);
        assert_eq!(parse(Some(&buf)), Ok((0x0102_0304, &[9u8, 8][..])));
    }

    #[test]
    fn rejects_what_is_not_a_frame() {
        assert_eq!(parse(None), Err(FrameError::Missing));
        assert_eq!(parse(Some(&[])), Err(FrameError::TooShort(0)));
        assert_eq!(parse(Some(&[0, 0, 0, 1])), Err(FrameError::TooShort(4)));
        assert_eq!(
            parse(Some(b"{\"json\":1}")),
            Err(FrameError::BadMagic(b'{'))
        );
        // A header with an empty datum is a frame; whether the datum decodes is the decoder's call.
        assert_eq!(parse(Some(&[0, 0, 0, 0, 7])), Ok((7, &[][..])));
    }
}
