//! The streaming encryptor: plaintext bytes in, header and frames out.

use bytes::{BufMut, BytesMut};
use zeroize::Zeroizing;

use super::frame::{FINAL_FRAME_MARKER, FrameCipher, FrameKind, frame_iv};
use super::{
    EncryptedDataKey, EncryptionContext, Error, Header, MAX_EDKS, MAX_FRAME_LENGTH, MESSAGE_ID_LEN,
    TAG_LEN,
};
use crate::keys::DataKey;

/// Encrypts one message, frame by frame.
///
/// The encryptor owns the sequence counter and the final-frame step: [`Encryptor::update`]
/// emits each regular frame as soon as its `frame_length` bytes of plaintext are in, and
/// [`Encryptor::finish`] consumes the encryptor to emit the final frame, so nothing can be
/// written after it. A plaintext that is an exact multiple of the frame length ends with an
/// empty final frame, as AWS's SDKs write it.
pub struct Encryptor {
    sealer: Sealer,
    header: Vec<u8>,
    frame_length: usize,
    /// Plaintext of the frame being filled; always shorter than `frame_length` between calls.
    pending: Zeroizing<Vec<u8>>,
}

/// The cipher and the sequence counter: every frame sealed takes the next sequence number.
struct Sealer {
    cipher: FrameCipher,
    /// The sequence number of the next frame.
    sequence: u32,
}

impl Encryptor {
    /// Starts a message under `data_key`, whose wrapped forms are `edks`.
    ///
    /// The message id comes from the operating system's CSPRNG, so the derived content key is
    /// unique to this message.
    pub fn new(
        data_key: &DataKey,
        edks: Vec<EncryptedDataKey>,
        context: EncryptionContext,
        frame_length: u32,
    ) -> Result<Self, Error> {
        check_frame_length(frame_length)?;
        if edks.is_empty() || edks.len() > MAX_EDKS {
            return Err(Error::Limit(format!(
                "a message needs 1 to {MAX_EDKS} encrypted data keys, got {}",
                edks.len()
            )));
        }
        let too_long = |edk: &EncryptedDataKey| {
            [&edk.provider_id, &edk.provider_info, &edk.ciphertext]
                .iter()
                .any(|field| field.len() > usize::from(u16::MAX))
        };
        if edks.iter().any(too_long) {
            return Err(Error::Limit(
                "encrypted data key field longer than 65535 bytes".into(),
            ));
        }

        let mut message_id = [0u8; MESSAGE_ID_LEN];
        getrandom::fill(&mut message_id).map_err(|_| Error::Random)?;
        let (cipher, commitment) = FrameCipher::derive(data_key, &message_id);

        let header = Header {
            message_id,
            context,
            edks,
            frame_length,
            commitment,
        };
        let mut bytes = header.serialize_body();
        let tag = cipher.header_tag(&bytes);
        bytes.extend_from_slice(&tag);

        let frame_length = frame_length as usize;
        Ok(Encryptor {
            sealer: Sealer {
                cipher,
                sequence: 1,
            },
            header: bytes,
            frame_length,
            pending: Zeroizing::new(Vec::with_capacity(frame_length)),
        })
    }

    /// The serialized header, tag included: the first bytes of the message.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    pub fn frame_length(&self) -> usize {
        self.frame_length
    }

    /// Encrypts `plaintext` and appends every frame it completes to `out`.
    ///
    /// Whole frames are encrypted straight from `plaintext` into `out`; only a partial frame at
    /// either end is buffered.
    pub fn update(&mut self, mut plaintext: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        while !plaintext.is_empty() {
            if self.pending.is_empty() && plaintext.len() >= self.frame_length {
                let (frame, rest) = plaintext.split_at(self.frame_length);
                self.sealer.seal_regular(frame, out)?;
                plaintext = rest;
                continue;
            }

            let take = (self.frame_length - self.pending.len()).min(plaintext.len());
            let (head, rest) = plaintext.split_at(take);
            self.pending.extend_from_slice(head);
            plaintext = rest;

            if self.pending.len() == self.frame_length {
                self.sealer.seal_regular(&self.pending, out)?;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Appends the final frame, holding whatever plaintext is still buffered, and ends the
    /// message.
    pub fn finish(self, out: &mut BytesMut) {
        self.sealer.seal_final(&self.pending, out);
    }
}

impl Sealer {
    fn seal_regular(&mut self, plaintext: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        // The final frame needs a sequence number too, so regular frames stop one short of
        // u32::MAX (which would also be the final-frame marker).
        if self.sequence >= FINAL_FRAME_MARKER - 1 {
            return Err(Error::Limit(
                "message has the maximum number of frames".into(),
            ));
        }
        out.reserve(plaintext.len() + 4 + super::IV_LEN + TAG_LEN);
        out.put_u32(self.sequence);
        out.put_slice(&frame_iv(self.sequence));
        let start = out.len();
        out.put_slice(plaintext);
        let tag = self
            .cipher
            .seal(FrameKind::Regular, self.sequence, &mut out[start..]);
        out.put_slice(&tag);
        self.sequence += 1;
        Ok(())
    }

    fn seal_final(&self, plaintext: &[u8], out: &mut BytesMut) {
        out.reserve(plaintext.len() + super::FINAL_FRAME_OVERHEAD);
        out.put_u32(FINAL_FRAME_MARKER);
        out.put_u32(self.sequence);
        out.put_slice(&frame_iv(self.sequence));
        // The final frame holds less than one frame length, which is at most `MAX_FRAME_LENGTH`.
        out.put_u32(plaintext.len() as u32);
        let start = out.len();
        out.put_slice(plaintext);
        let tag = self
            .cipher
            .seal(FrameKind::Final, self.sequence, &mut out[start..]);
        out.put_slice(&tag);
    }
}

pub(crate) fn check_frame_length(frame_length: u32) -> Result<(), Error> {
    if frame_length == 0 || frame_length > MAX_FRAME_LENGTH {
        return Err(Error::Limit(format!(
            "frame length {frame_length} is outside 1..={MAX_FRAME_LENGTH}"
        )));
    }
    Ok(())
}
