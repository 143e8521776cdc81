//! Workloads shared by the benches: whole messages through the envelope, the raw AEAD
//! references, and range reads of a message in memory.
//!
//! `cargo test --all-targets` runs every bench once in test mode, which is criterion's mode
//! whenever `--bench` is absent from the arguments. [`benchmarking`] distinguishes the two, so that
//! test mode works on small objects and stays fast.

// Each bench binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::hint::black_box;
use std::ops::Range;
use std::time::Duration;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Tag};
use bytes::BytesMut;
use callseal::envelope::{
    Decryptor, EncryptedDataKey, EncryptionContext, Encryptor, Layout, ParsedHeader,
};
use callseal::ids::{ArtifactName, CallId, ObjectId, PracticeId};
use callseal::keys::DataKey;
use criterion::Criterion;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, UnboundKey};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// Plaintext bytes handed to the encryptor per call, and ciphertext bytes handed to the
/// decryptor per call: the chunk size of `callseal::envelope::io` and of local storage reads.
pub const CHUNK_LEN: usize = 256 * KIB;

/// Bytes per AEAD call in the raw references: the default frame length.
pub const PIECE_LEN: usize = 64 * KIB;

/// Length of a regular frame's AAD: message id (32), label (28), sequence number (4) and
/// content length (8).
const AAD_LEN: usize = 72;

/// Returns whether the bench measures (`cargo bench`) rather than running once as a test.
pub fn benchmarking() -> bool {
    std::env::args().any(|argument| argument == "--bench")
}

/// Criterion settings that keep `cargo bench` to a few minutes on two cores.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// A data key, one stand-in encrypted data key and the context of an object, as the gateway
/// passes them to [`Encryptor::new`].
///
/// The encrypted data key is not a real wrapping of the data key: wrapping runs once per
/// object, outside the frame loop these benches measure.
pub struct MessageKeys {
    pub data_key: DataKey,
    pub edks: Vec<EncryptedDataKey>,
    pub context: EncryptionContext,
}

impl MessageKeys {
    pub fn generate() -> Self {
        let id = ObjectId::new(
            PracticeId::new("bench-clinic").expect("valid practice id"),
            CallId::new("call_bench_0001").expect("valid call id"),
            ArtifactName::new("recording.wav").expect("valid artifact name"),
        );
        let edk = EncryptedDataKey {
            provider_id: b"callseal".to_vec(),
            provider_info: [b"bench-clinic/v1".as_slice(), &[0u8; 20]].concat(),
            ciphertext: vec![0xA5; 48],
        };
        MessageKeys {
            data_key: DataKey::generate().expect("operating system random numbers"),
            edks: vec![edk],
            context: EncryptionContext::for_object(&id),
        }
    }

    pub fn encryptor(&self, frame_length: usize) -> Encryptor {
        Encryptor::new(
            &self.data_key,
            self.edks.clone(),
            self.context.clone(),
            frame_length as u32,
        )
        .expect("valid frame length and data keys")
    }

    /// Encrypts `input` into one message, handing it over in `chunk_len` pieces; returns the
    /// message length. `out` is cleared after every call, as the gateway drains it into storage.
    pub fn encrypt(
        &self,
        input: &[u8],
        frame_length: usize,
        chunk_len: usize,
        out: &mut BytesMut,
    ) -> usize {
        let mut encryptor = self.encryptor(frame_length);
        let mut stored = encryptor.header().len();
        for chunk in input.chunks(chunk_len) {
            encryptor.update(chunk, out).expect("frame count limit");
            stored += black_box(&out[..]).len();
            out.clear();
        }
        encryptor.finish(out);
        stored += black_box(&out[..]).len();
        out.clear();
        stored
    }

    /// Encrypts `plaintext` into one whole message in memory.
    pub fn message(&self, plaintext: &[u8], frame_length: usize) -> Vec<u8> {
        let mut encryptor = self.encryptor(frame_length);
        let mut message = encryptor.header().to_vec();
        let mut out = BytesMut::new();
        for chunk in plaintext.chunks(CHUNK_LEN) {
            encryptor
                .update(chunk, &mut out)
                .expect("frame count limit");
            message.extend_from_slice(&out);
            out.clear();
        }
        encryptor.finish(&mut out);
        message.extend_from_slice(&out);
        message
    }
}

/// A whole message in memory, ready to decrypt.
pub struct Message {
    pub bytes: Vec<u8>,
    pub parsed: ParsedHeader,
    pub data_key: DataKey,
}

impl Message {
    pub fn new(keys: &MessageKeys, plaintext: &[u8], frame_length: usize) -> Self {
        let bytes = keys.message(plaintext, frame_length);
        let parsed = ParsedHeader::parse(&bytes)
            .expect("valid header")
            .expect("complete header");
        Message {
            bytes,
            parsed,
            data_key: keys.data_key.clone(),
        }
    }

    /// Decrypts the whole body in [`CHUNK_LEN`] chunks; returns the plaintext length. `out` is
    /// cleared after every call, as the gateway sends it on.
    pub fn decrypt(&self, out: &mut BytesMut) -> usize {
        let mut decryptor =
            Decryptor::new(&self.parsed, &self.data_key).expect("header authenticates");
        let mut released = 0;
        for chunk in self.bytes[self.parsed.len()..].chunks(CHUNK_LEN) {
            decryptor.update(chunk, out).expect("frames authenticate");
            released += black_box(&out[..]).len();
            out.clear();
        }
        decryptor.finish().expect("message is complete");
        released
    }

    /// Reads the plaintext `range` as the gateway serves a `Range` request once the header is
    /// parsed and the data key unwrapped. It computes the [`Layout`] from the object size and
    /// authenticates the final frame to prove that size. Then it plans the range, starts a
    /// [`Decryptor::for_range`] and decrypts the planned ciphertext in [`CHUNK_LEN`] chunks.
    ///
    /// Returns the bytes released; with `first_chunk_only` it stops after the first chunk that
    /// releases any.
    pub fn read_range(
        &self,
        range: Range<u64>,
        first_chunk_only: bool,
        out: &mut BytesMut,
    ) -> usize {
        let layout = Layout::new(&self.parsed, self.bytes.len() as u64).expect("valid object size");
        let final_plan = layout.final_frame_plan();
        let mut decryptor = Decryptor::for_range(&self.parsed, &self.data_key, &final_plan)
            .expect("header authenticates");
        decryptor
            .update(self.slice(final_plan.ciphertext.clone()), out)
            .expect("final frame authenticates");
        decryptor.finish().expect("final frame is complete");

        let plan = layout.plan(range).expect("range inside the plaintext");
        let mut decryptor = Decryptor::for_range(&self.parsed, &self.data_key, &plan)
            .expect("header authenticates");
        let mut released = 0;
        for chunk in self.slice(plan.ciphertext.clone()).chunks(CHUNK_LEN) {
            decryptor.update(chunk, out).expect("frames authenticate");
            released += black_box(&out[..]).len();
            out.clear();
            if first_chunk_only && released > 0 {
                return released;
            }
        }
        decryptor.finish().expect("range is complete");
        released
    }

    fn slice(&self, range: Range<u64>) -> &[u8] {
        &self.bytes[range.start as usize..range.end as usize]
    }
}

/// AES-256-GCM in [`PIECE_LEN`] pieces with `aes-gcm` and with `ring`, as references for the
/// envelope.
///
/// Each piece is first copied into a reused buffer and then sealed or opened in place, which is
/// what the envelope does with a frame, so the ratio envelope / raw isolates framing, nonces,
/// AAD and buffering.
pub struct RawAead {
    aes_gcm: Aes256Gcm,
    ring: LessSafeKey,
    aad: [u8; AAD_LEN],
}

/// Pieces sealed by [`RawAead::seal_all`], for the open references.
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    tags: Vec<[u8; 16]>,
}

impl RawAead {
    pub fn new() -> Self {
        let key = [0x42u8; 32];
        RawAead {
            aes_gcm: Aes256Gcm::new((&key).into()),
            ring: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32-byte key")),
            aad: [0x5A; AAD_LEN],
        }
    }

    /// Seals every piece of `input` once, keeping ciphertext and tags.
    pub fn seal_all(&self, input: &[u8]) -> Sealed {
        let mut ciphertext = input.to_vec();
        let tags = ciphertext
            .chunks_mut(PIECE_LEN)
            .enumerate()
            .map(|(index, piece)| {
                self.aes_gcm
                    .encrypt_inout_detached(&iv(index).into(), &self.aad, piece.into())
                    .expect("piece below the GCM limit")
                    .into()
            })
            .collect();
        Sealed { ciphertext, tags }
    }

    pub fn aes_gcm_seal(&self, input: &[u8], buffer: &mut Vec<u8>) {
        for (index, piece) in input.chunks(PIECE_LEN).enumerate() {
            buffer.clear();
            buffer.extend_from_slice(piece);
            let tag = self
                .aes_gcm
                .encrypt_inout_detached(&iv(index).into(), &self.aad, buffer.as_mut_slice().into())
                .expect("piece below the GCM limit");
            black_box((&buffer, &tag));
        }
    }

    /// Seals `data` in place piece by piece, without the copy (the content changes each call,
    /// the cost does not).
    pub fn aes_gcm_seal_no_copy(&self, data: &mut [u8]) {
        for (index, piece) in data.chunks_mut(PIECE_LEN).enumerate() {
            let tag = self
                .aes_gcm
                .encrypt_inout_detached(&iv(index).into(), &self.aad, piece.into())
                .expect("piece below the GCM limit");
            black_box(&tag);
        }
    }

    pub fn aes_gcm_open(&self, sealed: &Sealed, buffer: &mut Vec<u8>) {
        for (index, piece) in sealed.ciphertext.chunks(PIECE_LEN).enumerate() {
            buffer.clear();
            buffer.extend_from_slice(piece);
            self.aes_gcm
                .decrypt_inout_detached(
                    &iv(index).into(),
                    &self.aad,
                    buffer.as_mut_slice().into(),
                    &Tag::from(sealed.tags[index]),
                )
                .expect("piece authenticates");
            black_box(&buffer);
        }
    }

    pub fn ring_seal(&self, input: &[u8], buffer: &mut Vec<u8>) {
        for (index, piece) in input.chunks(PIECE_LEN).enumerate() {
            buffer.clear();
            buffer.extend_from_slice(piece);
            let tag = self
                .ring
                .seal_in_place_separate_tag(ring_nonce(index), Aad::from(&self.aad), buffer)
                .expect("piece below the GCM limit");
            black_box((&buffer, &tag));
        }
    }

    pub fn ring_open(&self, sealed: &Sealed, buffer: &mut Vec<u8>) {
        for (index, piece) in sealed.ciphertext.chunks(PIECE_LEN).enumerate() {
            buffer.clear();
            buffer.extend_from_slice(piece);
            let tag = ring::aead::Tag::from(sealed.tags[index]);
            self.ring
                .open_in_place_separate_tag(
                    ring_nonce(index),
                    Aad::from(&self.aad),
                    tag,
                    buffer,
                    0..,
                )
                .expect("piece authenticates");
            black_box(&buffer);
        }
    }
}

/// Returns the nonce of piece `index`, laid out like a frame IV: 8 zero bytes, then a u32 counter.
fn iv(index: usize) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[8..].copy_from_slice(&(index as u32 + 1).to_be_bytes());
    iv
}

fn ring_nonce(index: usize) -> ring::aead::Nonce {
    ring::aead::Nonce::assume_unique_for_key(iv(index))
}

/// Deterministic bytes that do not repeat within a frame (xorshift64).
pub fn plaintext(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}
