//! The message header: serialization, and parsing of untrusted bytes with limits checked before
//! anything is allocated.

use super::{
    COMMITMENT_LEN, CONTENT_TYPE_FRAMED, EncryptionContext, Error, MAX_EDKS, MAX_FRAME_LENGTH,
    MAX_HEADER_LEN, MESSAGE_ID_LEN, SUITE_ID, TAG_LEN, VERSION,
};

/// A data key wrapped by one keyring, as stored in the header. Not secret on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    /// The keyring's provider id: `callseal` for local keys, `aws-kms` for KMS keys.
    pub provider_id: Vec<u8>,
    /// Where the key came from: a key name and IV, or a KMS key ARN.
    pub provider_info: Vec<u8>,
    /// The wrapped data key.
    pub ciphertext: Vec<u8>,
}

impl EncryptedDataKey {
    /// The provider id as text, for display; `None` if it is not UTF-8.
    pub fn provider_id_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.provider_id).ok()
    }
}

/// The header fields of a message in format v2 with suite 0x0478.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub message_id: [u8; MESSAGE_ID_LEN],
    pub context: EncryptionContext,
    pub edks: Vec<EncryptedDataKey>,
    pub frame_length: u32,
    pub commitment: [u8; COMMITMENT_LEN],
}

impl Header {
    /// Serializes the header body: everything the header authentication tag covers.
    pub fn serialize_body(&self) -> Vec<u8> {
        let context = self.context.serialize();
        let mut out = Vec::with_capacity(128 + context.len());
        out.push(VERSION);
        out.extend_from_slice(&SUITE_ID.to_be_bytes());
        out.extend_from_slice(&self.message_id);
        // Lengths fit in u16: `EncryptionContext` and `Encryptor::new` bound them.
        out.extend_from_slice(&(context.len() as u16).to_be_bytes());
        out.extend_from_slice(&context);
        out.extend_from_slice(&(self.edks.len() as u16).to_be_bytes());
        for edk in &self.edks {
            for field in [&edk.provider_id, &edk.provider_info, &edk.ciphertext] {
                out.extend_from_slice(&(field.len() as u16).to_be_bytes());
                out.extend_from_slice(field);
            }
        }
        out.push(CONTENT_TYPE_FRAMED);
        out.extend_from_slice(&self.frame_length.to_be_bytes());
        out.extend_from_slice(&self.commitment);
        out
    }
}

/// A header parsed from untrusted bytes, not yet authenticated: its tag is checked only once a
/// keyring has produced the data key (see [`super::Decryptor::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    pub header: Header,
    /// The header body exactly as read: the AAD of the header tag.
    pub body: Vec<u8>,
    pub tag: [u8; TAG_LEN],
}

impl ParsedHeader {
    /// Returns the number of message bytes the header occupies, tag included.
    pub fn len(&self) -> usize {
        self.body.len() + TAG_LEN
    }

    /// Always false: a header has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Parses a header from the start of `bytes`.
    ///
    /// Returns `Ok(None)` while `bytes` is too short to hold the whole header, so a streaming
    /// caller can append more bytes and call again. Fields that bound later allocations (EDK
    /// count, field lengths, frame length) are checked as soon as they are read, before more
    /// input is awaited, and the header as a whole may not exceed [`MAX_HEADER_LEN`].
    pub fn parse(bytes: &[u8]) -> Result<Option<ParsedHeader>, Error> {
        match parse_header(bytes) {
            Ok(parsed) => Ok(Some(parsed)),
            Err(Incomplete::NeedMore) => Ok(None),
            Err(Incomplete::Invalid(error)) => Err(error),
        }
    }
}

enum Incomplete {
    NeedMore,
    Invalid(Error),
}

impl From<Error> for Incomplete {
    fn from(error: Error) -> Self {
        Incomplete::Invalid(error)
    }
}

/// A forward-only reader over the header bytes that reports `NeedMore` at the end of input and
/// enforces [`MAX_HEADER_LEN`].
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], Incomplete> {
        let end = self.position + length;
        if end > MAX_HEADER_LEN {
            return Err(Error::Limit(format!("header longer than {MAX_HEADER_LEN} bytes")).into());
        }
        let slice = self
            .bytes
            .get(self.position..end)
            .ok_or(Incomplete::NeedMore)?;
        self.position = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Incomplete> {
        let slice = self.take(N)?;
        let mut array = [0; N];
        array.copy_from_slice(slice);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, Incomplete> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Incomplete> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Incomplete> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn field(&mut self) -> Result<&'a [u8], Incomplete> {
        let length = usize::from(self.u16()?);
        self.take(length)
    }
}

fn parse_header(bytes: &[u8]) -> Result<ParsedHeader, Incomplete> {
    let mut cursor = Cursor { bytes, position: 0 };

    let version = cursor.u8()?;
    if version != VERSION {
        return Err(Error::Unsupported(format!("message format version {version:#04x}")).into());
    }
    let suite = cursor.u16()?;
    if suite != SUITE_ID {
        return Err(Error::Unsupported(format!("algorithm suite {suite:#06x}")).into());
    }
    let message_id = cursor.array::<MESSAGE_ID_LEN>()?;

    let context_bytes = cursor.field()?;
    let context = EncryptionContext::parse(context_bytes)?;

    let edk_count = usize::from(cursor.u16()?);
    if edk_count == 0 {
        return Err(Error::Malformed("no encrypted data keys").into());
    }
    if edk_count > MAX_EDKS {
        return Err(Error::Limit(format!(
            "{edk_count} encrypted data keys, at most {MAX_EDKS} are accepted"
        ))
        .into());
    }
    let mut edks = Vec::with_capacity(edk_count);
    for _ in 0..edk_count {
        edks.push(EncryptedDataKey {
            provider_id: cursor.field()?.to_vec(),
            provider_info: cursor.field()?.to_vec(),
            ciphertext: cursor.field()?.to_vec(),
        });
    }

    let content_type = cursor.u8()?;
    if content_type != CONTENT_TYPE_FRAMED {
        return Err(Error::Unsupported(format!("content type {content_type:#04x}")).into());
    }
    let frame_length = cursor.u32()?;
    if frame_length == 0 {
        return Err(Error::Malformed("frame length is zero").into());
    }
    if frame_length > MAX_FRAME_LENGTH {
        return Err(Error::Limit(format!(
            "frame length {frame_length} exceeds the maximum {MAX_FRAME_LENGTH}"
        ))
        .into());
    }
    let commitment = cursor.array::<COMMITMENT_LEN>()?;
    let body_len = cursor.position;
    let tag = cursor.array::<TAG_LEN>()?;

    let header = Header {
        message_id,
        context,
        edks,
        frame_length,
        commitment,
    };
    Ok(ParsedHeader {
        header,
        body: bytes[..body_len].to_vec(),
        tag,
    })
}
