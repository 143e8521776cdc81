//! Entry points for the fuzz targets in `fuzz/` and the tests that run the same code on random
//! input. Not part of the supported API.

use bytes::BytesMut;

use super::{Decryptor, EncryptionContext, Encryptor, Error, ParsedHeader};
use crate::keys::DataKey;

/// The data key of every message the fuzz targets decrypt.
pub const FUZZ_KEY: [u8; 32] = [0x5A; 32];

/// Parses `data` as a message and decrypts it under [`FUZZ_KEY`], feeding the body in pieces
/// whose size the last byte of `data` chooses. Returns the plaintext released, or the error.
///
/// The checks an untrusted message can break are asserted here, so a fuzzer reports them as
/// crashes: a failed decryption released no more plaintext than the frames it authenticated
/// contain, and success means the whole message was consumed.
pub fn decrypt_untrusted(data: &[u8]) -> Result<Vec<u8>, Error> {
    let piece = usize::from(data.last().copied().unwrap_or(1)).max(1) * 97;
    let parsed = ParsedHeader::parse(data)?.ok_or(Error::Truncated)?;
    let key = DataKey::from_slice(&FUZZ_KEY).expect("FUZZ_KEY has 32 bytes");
    let mut decryptor = Decryptor::new(&parsed, &key)?;
    let frame_length = parsed.header.frame_length as u64;

    let mut released = BytesMut::new();
    for chunk in data[parsed.len()..].chunks(piece) {
        let before = released.len();
        let result = decryptor.update(chunk, &mut released);
        let bound = decryptor.frames_opened() * frame_length;
        assert!(
            released.len() as u64 <= bound,
            "plaintext beyond the authenticated frames"
        );
        if let Err(error) = result {
            assert!(
                released.len() >= before,
                "released plaintext was taken back"
            );
            return Err(error);
        }
    }
    decryptor.finish()?;
    Ok(released.to_vec())
}

/// Encrypts `plaintext` under [`FUZZ_KEY`]: seeds for the fuzz corpus.
pub fn seed_message(plaintext: &[u8], frame_length: u32) -> Vec<u8> {
    let key = DataKey::from_slice(&FUZZ_KEY).expect("FUZZ_KEY has 32 bytes");
    let edk = super::EncryptedDataKey {
        provider_id: b"fuzz".to_vec(),
        provider_info: b"fuzz".to_vec(),
        ciphertext: vec![0; 48],
    };
    let context =
        EncryptionContext::from_pairs([("practice", "p"), ("call", "c"), ("artifact", "a")])
            .expect("valid context");
    let mut encryptor =
        Encryptor::new(&key, vec![edk], context, frame_length).expect("valid frame length");
    let mut out = BytesMut::from(encryptor.header());
    encryptor
        .update(plaintext, &mut out)
        .expect("below the frame limit");
    encryptor.finish(&mut out);
    out.to_vec()
}
