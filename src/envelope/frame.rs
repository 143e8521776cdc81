//! Per-message keys and the sealing and opening of single frames.
//!
//! Nonces never repeat under one content key: the content key is derived from a random 32-byte
//! message id, so it is unique to one message, and within a message the IV of frame `n` is
//! `n` itself (8 zero bytes then u32 `n`), with each sequence number used once.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha512;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{COMMITMENT_LEN, Error, IV_LEN, MESSAGE_ID_LEN, SUITE_ID, TAG_LEN};
use crate::keys::{DataKey, KEY_LEN};

/// Marks a final frame where a regular frame would have its sequence number.
pub(crate) const FINAL_FRAME_MARKER: u32 = 0xFFFF_FFFF;
/// Bytes a regular frame adds to its plaintext: sequence number, IV, tag.
pub const REGULAR_FRAME_OVERHEAD: usize = 4 + IV_LEN + TAG_LEN;
/// Bytes the final frame adds to its plaintext: marker, sequence number, IV, length, tag.
pub const FINAL_FRAME_OVERHEAD: usize = 4 + 4 + IV_LEN + 4 + TAG_LEN;
/// Bytes of a final frame before its content: enough to learn its length.
pub(crate) const FINAL_FRAME_PREFIX: usize = 4 + 4 + IV_LEN + 4;

const REGULAR_LABEL: &[u8] = b"AWSKMSEncryptionClient Frame";
const FINAL_LABEL: &[u8] = b"AWSKMSEncryptionClient Final Frame";
const AAD_MAX: usize = MESSAGE_ID_LEN + FINAL_LABEL.len() + 4 + 8;

/// Whether a frame is a regular frame or the final frame: they differ in label and layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    Regular,
    Final,
}

/// The content cipher of one message, bound to its message id.
pub(crate) struct FrameCipher {
    aead: Aes256Gcm,
    message_id: [u8; MESSAGE_ID_LEN],
}

impl FrameCipher {
    /// Derives the content key and the commitment key of a message (suite 0x0478):
    /// HKDF-SHA512 with the message id as salt, info `0x0478 || "DERIVEKEY"` for the content
    /// key and `"COMMITKEY"` for the commitment key.
    ///
    /// NOTE: the HKDF state holds the pseudorandom key in `hkdf`'s own types, which do not
    /// zeroize on drop; only the expanded keys are zeroized here.
    pub(crate) fn derive(
        data_key: &DataKey,
        message_id: &[u8; MESSAGE_ID_LEN],
    ) -> (FrameCipher, [u8; COMMITMENT_LEN]) {
        let hkdf = Hkdf::<Sha512>::new(Some(message_id), data_key.expose());

        let mut info = [0u8; 2 + 9];
        info[..2].copy_from_slice(&SUITE_ID.to_be_bytes());
        info[2..].copy_from_slice(b"DERIVEKEY");
        let mut content_key = Zeroizing::new([0u8; KEY_LEN]);
        let mut commitment = [0u8; COMMITMENT_LEN];
        // 32 bytes is far below HKDF-SHA512's output limit of 255 * 64 bytes.
        hkdf.expand(&info, content_key.as_mut_slice())
            .expect("32-byte HKDF output is within the limit");
        hkdf.expand(b"COMMITKEY", &mut commitment)
            .expect("32-byte HKDF output is within the limit");

        let aead = Aes256Gcm::new((&*content_key).into());
        (
            FrameCipher {
                aead,
                message_id: *message_id,
            },
            commitment,
        )
    }

    /// Computes the header authentication tag: GCM over an empty plaintext, IV of zeros, with
    /// the header body as AAD.
    pub(crate) fn header_tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let tag = self
            .aead
            .encrypt_inout_detached(&Nonce::from([0u8; IV_LEN]), body, (&mut [][..]).into())
            .expect("GCM accepts any header length below 2^36 bytes");
        tag.into()
    }

    /// Checks the header authentication tag in constant time.
    pub(crate) fn verify_header(&self, body: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), Error> {
        self.aead
            .decrypt_inout_detached(
                &Nonce::from([0u8; IV_LEN]),
                body,
                (&mut [][..]).into(),
                &Tag::from(*tag),
            )
            .map_err(|_| Error::Authentication)
    }

    /// Encrypts `buffer` in place as frame `sequence` and returns its tag.
    pub(crate) fn seal(&self, kind: FrameKind, sequence: u32, buffer: &mut [u8]) -> [u8; TAG_LEN] {
        let (aad, aad_len) = self.frame_aad(kind, sequence, buffer.len());
        let tag = self
            .aead
            .encrypt_inout_detached(&frame_iv(sequence).into(), &aad[..aad_len], buffer.into())
            .expect("GCM accepts frames up to 2^36 bytes and frames are at most 1 MiB");
        tag.into()
    }

    /// Decrypts `buffer` in place as frame `sequence`. On failure the buffer is zeroized, so
    /// no unauthenticated plaintext survives in it.
    pub(crate) fn open(
        &self,
        kind: FrameKind,
        sequence: u32,
        buffer: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        let (aad, aad_len) = self.frame_aad(kind, sequence, buffer.len());
        let result = self.aead.decrypt_inout_detached(
            &frame_iv(sequence).into(),
            &aad[..aad_len],
            (&mut *buffer).into(),
            &Tag::from(*tag),
        );
        if result.is_err() {
            buffer.fill(0);
            return Err(Error::Authentication);
        }
        Ok(())
    }

    /// Frame AAD: message id, label, u32 sequence number, u64 plaintext length.
    fn frame_aad(&self, kind: FrameKind, sequence: u32, length: usize) -> ([u8; AAD_MAX], usize) {
        let label = match kind {
            FrameKind::Regular => REGULAR_LABEL,
            FrameKind::Final => FINAL_LABEL,
        };
        let mut aad = [0u8; AAD_MAX];
        let mut position = 0;
        for part in [
            &self.message_id[..],
            label,
            &sequence.to_be_bytes(),
            &(length as u64).to_be_bytes(),
        ] {
            aad[position..position + part.len()].copy_from_slice(part);
            position += part.len();
        }
        (aad, position)
    }
}

/// Checks the commitment key a header states against the one derived from the data key, in
/// constant time.
pub(crate) fn verify_commitment(
    derived: &[u8; COMMITMENT_LEN],
    stated: &[u8; COMMITMENT_LEN],
) -> Result<(), Error> {
    if bool::from(derived.ct_eq(stated)) {
        Ok(())
    } else {
        Err(Error::Authentication)
    }
}

/// The IV of frame `sequence`: 8 zero bytes, then the sequence number.
pub(crate) fn frame_iv(sequence: u32) -> [u8; IV_LEN] {
    let mut iv = [0u8; IV_LEN];
    iv[8..].copy_from_slice(&sequence.to_be_bytes());
    iv
}

/// Returns the total size of the frame that starts at `bytes[0]`, once enough of it is present
/// to tell (`Ok(None)` before that). A final frame that claims more than `frame_length` bytes is
/// rejected here, before any buffer is sized from it.
pub(crate) fn frame_size(bytes: &[u8], frame_length: usize) -> Result<Option<usize>, Error> {
    let Some(first) = bytes.first_chunk::<4>() else {
        return Ok(None);
    };
    if u32::from_be_bytes(*first) != FINAL_FRAME_MARKER {
        return Ok(Some(frame_length + REGULAR_FRAME_OVERHEAD));
    }
    let Some(prefix) = bytes.first_chunk::<FINAL_FRAME_PREFIX>() else {
        return Ok(None);
    };
    let content_length = u32::from_be_bytes(prefix[20..24].try_into().expect("4 bytes"));
    if content_length as usize > frame_length {
        return Err(Error::Malformed("final frame longer than the frame length"));
    }
    Ok(Some(content_length as usize + FINAL_FRAME_OVERHEAD))
}
