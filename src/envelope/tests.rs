//! Format edge cases, tampering and property tests for the envelope core.

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::keys::DataKey;

const KIB: usize = 1024;

fn data_key() -> DataKey {
    DataKey::from_slice(&[7u8; 32]).unwrap()
}

fn other_key() -> DataKey {
    DataKey::from_slice(&[8u8; 32]).unwrap()
}

fn edk() -> EncryptedDataKey {
    EncryptedDataKey {
        provider_id: b"test".to_vec(),
        provider_info: b"key".to_vec(),
        ciphertext: vec![0xAB; 48],
    }
}

fn context() -> EncryptionContext {
    EncryptionContext::from_pairs([("practice", "p1"), ("call", "c1"), ("artifact", "a.wav")])
        .unwrap()
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Encrypts `data`, feeding the encryptor in pieces of the given sizes (cycled).
fn encrypt_chunked(data: &[u8], frame_length: u32, pieces: &[usize]) -> Vec<u8> {
    let mut encryptor = Encryptor::new(&data_key(), vec![edk()], context(), frame_length).unwrap();
    let mut out = BytesMut::from(encryptor.header());
    let mut rest = data;
    for &piece in pieces.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(piece.clamp(1, rest.len()));
        encryptor.update(head, &mut out).unwrap();
        rest = tail;
    }
    encryptor.finish(&mut out);
    out.to_vec()
}

fn encrypt(data: &[u8], frame_length: u32) -> Vec<u8> {
    encrypt_chunked(data, frame_length, &[data.len().max(1)])
}

/// Decrypts `message` fed in pieces; returns the plaintext released before any error, and the
/// outcome.
fn decrypt_with(message: &[u8], key: &DataKey, pieces: &[usize]) -> (Vec<u8>, Result<(), Error>) {
    let parsed = match ParsedHeader::parse(message) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return (Vec::new(), Err(Error::Truncated)),
        Err(error) => return (Vec::new(), Err(error)),
    };
    let mut decryptor = match Decryptor::new(&parsed, key) {
        Ok(decryptor) => decryptor,
        Err(error) => return (Vec::new(), Err(error)),
    };
    let mut released = Vec::new();
    let mut rest = &message[parsed.len()..];
    for &piece in pieces.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(piece.clamp(1, rest.len()));
        let mut out = BytesMut::new();
        let result = decryptor.update(head, &mut out);
        released.extend_from_slice(&out);
        if let Err(error) = result {
            return (released, Err(error));
        }
        rest = tail;
    }
    let result = decryptor.finish();
    (released, result)
}

fn decrypt(message: &[u8]) -> (Vec<u8>, Result<(), Error>) {
    decrypt_with(message, &data_key(), &[usize::MAX])
}

fn header_len(message: &[u8]) -> usize {
    ParsedHeader::parse(message).unwrap().unwrap().len()
}

/// Offset of regular frame `n` (1-based) in a message with frame length `f`.
fn frame_offset(message: &[u8], f: usize, n: usize) -> usize {
    header_len(message) + (n - 1) * (f + REGULAR_FRAME_OVERHEAD)
}

// Round trips

#[test]
fn round_trip_boundary_sizes() {
    for f in [4 * KIB, 64 * KIB] {
        for len in [0, 1, f - 1, f, f + 1, 16 * f, 16 * f + 1] {
            let data = plaintext(len);
            let message = encrypt(&data, f as u32);
            let (released, result) = decrypt(&message);
            assert_eq!(result, Ok(()), "frame {f}, size {len}");
            assert!(released == data, "frame {f}, size {len}: plaintext differs");
        }
    }
}

#[test]
fn exact_multiple_ends_with_empty_final_frame() {
    let f = 4 * KIB;
    let message = encrypt(&plaintext(2 * f), f as u32);
    let expected = header_len(&message) + 2 * (f + REGULAR_FRAME_OVERHEAD) + FINAL_FRAME_OVERHEAD;
    assert_eq!(message.len(), expected);
}

#[test]
fn empty_plaintext_is_one_empty_final_frame() {
    let message = encrypt(&[], 4096);
    assert_eq!(message.len(), header_len(&message) + FINAL_FRAME_OVERHEAD);
}

#[test]
fn header_fields_round_trip() {
    let message = encrypt(b"x", 4096);
    let parsed = ParsedHeader::parse(&message).unwrap().unwrap();
    assert_eq!(parsed.header.context, context());
    assert_eq!(parsed.header.edks, vec![edk()]);
    assert_eq!(parsed.header.frame_length, 4096);
    assert_eq!(message[0], VERSION);
    assert_eq!(&message[1..3], &SUITE_ID.to_be_bytes());
}

#[test]
fn header_parse_waits_for_bytes() {
    let message = encrypt(b"x", 4096);
    let len = header_len(&message);
    for cut in 0..len {
        assert_eq!(
            ParsedHeader::parse(&message[..cut]),
            Ok(None),
            "cut at {cut}"
        );
    }
}

#[test]
fn message_ids_differ() {
    let first = encrypt(b"same", 4096);
    let second = encrypt(b"same", 4096);
    assert_ne!(first[3..35], second[3..35]);
}

#[test]
fn frame_length_limits() {
    for bad in [0, MAX_FRAME_LENGTH + 1] {
        assert!(
            Encryptor::new(&data_key(), vec![edk()], context(), bad).is_err(),
            "{bad}"
        );
    }
    let data = plaintext(MAX_FRAME_LENGTH as usize + 1);
    let (released, result) = decrypt(&encrypt(&data, MAX_FRAME_LENGTH));
    assert_eq!(result, Ok(()));
    assert!(released == data);
}

fn assert_round_trip(
    len: usize,
    frame_length: u32,
    write_pieces: &[usize],
    read_pieces: &[usize],
) -> Result<(), TestCaseError> {
    let data = plaintext(len);
    let message = encrypt_chunked(&data, frame_length, write_pieces);
    let (released, result) = decrypt_with(&message, &data_key(), read_pieces);
    prop_assert_eq!(result, Ok(()));
    prop_assert!(released == data);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip_random_chunking(
        len in 0usize..300_000,
        frame_length in prop::sample::select(vec![4096u32, 65536]),
        write_pieces in prop::collection::vec(1usize..=64 * KIB, 1..8),
        read_pieces in prop::collection::vec(1usize..=64 * KIB, 1..8),
    ) {
        assert_round_trip(len, frame_length, &write_pieces, &read_pieces)?;
    }

    #[test]
    fn round_trip_tiny_frames(
        len in 0usize..2_000,
        frame_length in prop::sample::select(vec![1u32, 2, 17]),
        write_pieces in prop::collection::vec(1usize..=64, 1..8),
        read_pieces in prop::collection::vec(1usize..=64, 1..8),
    ) {
        assert_round_trip(len, frame_length, &write_pieces, &read_pieces)?;
    }
}

// Tampering: each case checks the error and that no plaintext of an unverified frame escaped.

#[test]
fn flipped_header_bit_rejected() {
    let mut message = encrypt(&plaintext(10 * KIB), 4096);
    for position in [
        0,
        3,
        40,
        header_len(&message) - 20,
        header_len(&message) - 1,
    ] {
        let mut tampered = message.clone();
        tampered[position] ^= 0x01;
        let (released, result) = decrypt(&tampered);
        assert!(result.is_err(), "bit flip at {position} accepted");
        assert!(
            released.is_empty(),
            "plaintext released after header flip at {position}"
        );
    }
    message.truncate(10);
    assert!(decrypt(&message).1.is_err());
}

#[test]
fn flipped_bit_in_frame_2_rejected() {
    let f = 4 * KIB;
    let data = plaintext(4 * f);
    let mut message = encrypt(&data, f as u32);
    let position = frame_offset(&message, f, 2) + 100;
    message[position] ^= 0x80;
    let (released, result) = decrypt(&message);
    assert_eq!(result, Err(Error::Authentication));
    assert!(released == data[..f], "only frame 1 may be released");
}

#[test]
fn flipped_bit_in_final_frame_rejected() {
    let f = 4 * KIB;
    let data = plaintext(2 * f + 10);
    let mut message = encrypt(&data, f as u32);
    let last = message.len() - 20;
    message[last] ^= 0x01;
    let (released, result) = decrypt(&message);
    assert_eq!(result, Err(Error::Authentication));
    assert!(released == data[..2 * f], "final frame content released");
}

#[test]
fn flipped_tag_rejected() {
    let f = 4 * KIB;
    let mut message = encrypt(&plaintext(3 * f), f as u32);
    let tag_position = frame_offset(&message, f, 2) - 1;
    message[tag_position] ^= 0x01;
    let (released, result) = decrypt(&message);
    assert_eq!(result, Err(Error::Authentication));
    assert!(released.is_empty());
}

#[test]
fn swapped_frames_rejected() {
    let f = 4 * KIB;
    let data = plaintext(4 * f);
    let message = encrypt(&data, f as u32);
    let stride = f + REGULAR_FRAME_OVERHEAD;
    let first = frame_offset(&message, f, 2);
    let mut swapped = message.clone();
    swapped[first..first + stride].copy_from_slice(&message[first + stride..first + 2 * stride]);
    swapped[first + stride..first + 2 * stride].copy_from_slice(&message[first..first + stride]);
    let (released, result) = decrypt(&swapped);
    assert!(result.is_err());
    assert!(released == data[..f]);
}

#[test]
fn duplicated_frame_rejected() {
    let f = 4 * KIB;
    let data = plaintext(3 * f);
    let message = encrypt(&data, f as u32);
    let stride = f + REGULAR_FRAME_OVERHEAD;
    let second = frame_offset(&message, f, 2);
    let mut duplicated = message[..second + stride].to_vec();
    duplicated.extend_from_slice(&message[second..]);
    let (released, result) = decrypt(&duplicated);
    assert!(result.is_err());
    assert!(released == data[..2 * f]);
}

#[test]
fn dropped_final_frame_rejected() {
    let f = 4 * KIB;
    let data = plaintext(2 * f + 5);
    let message = encrypt(&data, f as u32);
    let without_final = &message[..message.len() - (5 + FINAL_FRAME_OVERHEAD)];
    let (released, result) = decrypt(without_final);
    assert_eq!(result, Err(Error::Truncated));
    assert!(released == data[..2 * f]);
}

#[test]
fn truncation_anywhere_rejected() {
    let f = 64;
    let message = encrypt(&plaintext(3 * f + 7), f as u32);
    for cut in 0..message.len() {
        let (_, result) = decrypt(&message[..cut]);
        assert!(result.is_err(), "truncation to {cut} bytes accepted");
    }
}

#[test]
fn appended_byte_rejected() {
    let data = plaintext(5000);
    let mut message = encrypt(&data, 4096);
    message.push(0);
    let (released, result) = decrypt(&message);
    assert_eq!(result, Err(Error::TrailingData));
    assert!(released == data);
}

#[test]
fn second_final_frame_rejected() {
    let message = encrypt(b"abc", 4096);
    let final_frame = message[header_len(&message)..].to_vec();
    let mut doubled = message.clone();
    doubled.extend_from_slice(&final_frame);
    assert_eq!(decrypt(&doubled).1, Err(Error::TrailingData));
}

#[test]
fn final_frame_longer_than_frame_length_rejected() {
    let f = 4096;
    let mut message = encrypt(&plaintext(100), f);
    let length_field = header_len(&message) + 4 + 4 + IV_LEN;
    message[length_field..length_field + 4].copy_from_slice(&(f + 1).to_be_bytes());
    let (released, result) = decrypt(&message);
    assert!(matches!(result, Err(Error::Malformed(_))), "{result:?}");
    assert!(released.is_empty());
}

#[test]
fn sequence_gap_rejected() {
    let f = 64;
    let data = plaintext(3 * f);
    let message = encrypt(&data, f as u32);
    let stride = f + REGULAR_FRAME_OVERHEAD;
    let second = frame_offset(&message, f, 2);
    let mut gapped = message[..second].to_vec();
    gapped.extend_from_slice(&message[second + stride..]);
    let (released, result) = decrypt(&gapped);
    assert_eq!(
        result,
        Err(Error::Malformed("frame sequence number out of order"))
    );
    assert!(released == data[..f]);
}

#[test]
fn wrong_iv_rejected() {
    let f = 64;
    let mut message = encrypt(&plaintext(2 * f), f as u32);
    let iv = frame_offset(&message, f, 1) + 4;
    message[iv] = 1;
    let (released, result) = decrypt(&message);
    assert!(matches!(result, Err(Error::Malformed(_))));
    assert!(released.is_empty());
}

#[test]
fn wrong_key_rejected() {
    let message = encrypt(&plaintext(10_000), 4096);
    let (released, result) = decrypt_with(&message, &other_key(), &[usize::MAX]);
    assert_eq!(result, Err(Error::Authentication));
    assert!(released.is_empty());
}

// Header limits: rejected while parsing, before the claimed sizes are allocated.

/// A header body prefix up to and including the EDK count.
fn header_prefix(edk_count: u16) -> Vec<u8> {
    let mut bytes = vec![VERSION];
    bytes.extend_from_slice(&SUITE_ID.to_be_bytes());
    bytes.extend_from_slice(&[0u8; MESSAGE_ID_LEN]);
    bytes.extend_from_slice(&0u16.to_be_bytes());
    bytes.extend_from_slice(&edk_count.to_be_bytes());
    bytes
}

#[test]
fn header_claiming_65535_edks_rejected() {
    let result = ParsedHeader::parse(&header_prefix(u16::MAX));
    assert!(matches!(result, Err(Error::Limit(_))), "{result:?}");
}

#[test]
fn header_edk_count_limit_pair() {
    let mut at_limit = header_prefix(MAX_EDKS as u16);
    at_limit.extend_from_slice(&[0, 0]);
    assert_eq!(ParsedHeader::parse(&at_limit), Ok(None));
    let over = header_prefix(MAX_EDKS as u16 + 1);
    assert!(matches!(ParsedHeader::parse(&over), Err(Error::Limit(_))));
}

#[test]
fn header_claiming_4_gib_frame_rejected() {
    let message = encrypt(b"x", 4096);
    let frame_length_field = header_len(&message) - TAG_LEN - COMMITMENT_LEN - 4;
    let mut tampered = message.clone();
    tampered[frame_length_field..frame_length_field + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    let result = ParsedHeader::parse(&tampered);
    assert!(matches!(result, Err(Error::Limit(_))), "{result:?}");
}

#[test]
fn header_rejects_other_versions_and_suites() {
    let message = encrypt(b"x", 4096);
    let mut version_1 = message.clone();
    version_1[0] = 0x01;
    assert!(matches!(
        ParsedHeader::parse(&version_1),
        Err(Error::Unsupported(_))
    ));
    let mut signed_suite = message.clone();
    signed_suite[1..3].copy_from_slice(&0x0578u16.to_be_bytes());
    assert!(matches!(
        ParsedHeader::parse(&signed_suite),
        Err(Error::Unsupported(_))
    ));
    let mut non_framed = message.clone();
    let content_type = header_len(&message) - TAG_LEN - COMMITMENT_LEN - 4 - 1;
    non_framed[content_type] = 0x01;
    assert!(matches!(
        ParsedHeader::parse(&non_framed),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn header_rejects_zero_edks() {
    let mut bytes = header_prefix(0);
    bytes.extend_from_slice(&[0u8; 64]);
    assert!(matches!(
        ParsedHeader::parse(&bytes),
        Err(Error::Malformed(_))
    ));
}

// Expected encryption context

#[test]
fn context_must_match_exactly() {
    let message = encrypt(b"x", 4096);
    let header = ParsedHeader::parse(&message).unwrap().unwrap().header;
    assert_eq!(check_context(&header, &context()), Ok(()));

    let cases = [
        (
            [("practice", "p2"), ("call", "c1"), ("artifact", "a.wav")],
            "practice",
        ),
        (
            [("practice", "p1"), ("call", "c2"), ("artifact", "a.wav")],
            "call",
        ),
        (
            [("practice", "p1"), ("call", "c1"), ("artifact", "b.wav")],
            "artifact",
        ),
    ];
    for (pairs, key) in cases {
        let expected = EncryptionContext::from_pairs(pairs).unwrap();
        assert_eq!(
            check_context(&header, &expected),
            Err(Error::ContextMismatch { key: key.into() })
        );
    }
    let extra = EncryptionContext::from_pairs([
        ("practice", "p1"),
        ("call", "c1"),
        ("artifact", "a.wav"),
        ("extra", "x"),
    ])
    .unwrap();
    assert!(check_context(&header, &extra).is_err());
    assert!(check_context(&header, &EncryptionContext::default()).is_err());
}

// Random access

fn parsed(message: &[u8]) -> ParsedHeader {
    ParsedHeader::parse(message).unwrap().unwrap()
}

#[test]
fn layout_matches_real_sizes() {
    for f in [64usize, 4096] {
        for len in [0, 1, f - 1, f, f + 1, 16 * f, 16 * f + 1] {
            let message = encrypt(&plaintext(len), f as u32);
            let layout = Layout::new(&parsed(&message), message.len() as u64).unwrap();
            assert_eq!(layout.plaintext_len(), len as u64, "frame {f} size {len}");
            assert_eq!(layout.object_size(), message.len() as u64);
        }
    }
}

#[test]
fn layout_rejects_impossible_sizes() {
    let f = 64;
    let message = encrypt(&plaintext(3 * f), f as u32);
    let header = parsed(&message);
    let h = header.len() as u64;
    assert_eq!(Layout::new(&header, h + 39), Err(Error::Truncated));
    // A final frame of frame length + 1 bytes.
    let impossible = h + FINAL_FRAME_OVERHEAD as u64 + f as u64 + 1;
    assert!(matches!(
        Layout::new(&header, impossible),
        Err(Error::Malformed(_))
    ));
}

fn read_range(
    message: &[u8],
    range: std::ops::Range<u64>,
) -> Result<(Vec<u8>, u64), io::StreamError> {
    let mut cursor = std::io::Cursor::new(message);
    io::read_range(
        &mut cursor,
        &parsed(message),
        &data_key(),
        message.len() as u64,
        range,
    )
}

#[test]
fn range_reads_return_the_right_bytes() {
    let f = 64u64;
    let len = 10 * f + 13;
    let data = plaintext(len as usize);
    let message = encrypt(&data, f as u32);
    let ranges = [
        0..1,
        len - 1..len,
        f - 1..f + 1,
        3 * f..4 * f,
        0..len,
        5..len,
        10 * f..len,
    ];
    for range in ranges {
        let (bytes, _) = read_range(&message, range.clone()).unwrap();
        let expected = &data[range.start as usize..range.end as usize];
        assert!(bytes == expected, "range {range:?}");
    }
}

#[test]
fn range_opens_only_covering_frames() {
    let f = 64u64;
    let message = encrypt(&plaintext(100 * f as usize), f as u32);
    // The final frame (empty here) plus the frames covering the range.
    let cases = [
        (0..1, 1 + 1),
        (f - 1..f + 1, 1 + 2),
        (50 * f..50 * f + 10, 1 + 1),
        (0..3 * f, 1 + 3),
    ];
    for (range, frames) in cases {
        let (_, opened) = read_range(&message, range.clone()).unwrap();
        assert_eq!(opened, frames, "range {range:?}");
    }
}

#[test]
fn range_verifies_final_frame() {
    let f = 64;
    let data = plaintext(10 * f + 3);
    let mut message = encrypt(&data, f as u32);
    let last = message.len() - 1;
    message[last] ^= 1;
    let result = read_range(&message, 0..10);
    assert!(matches!(
        result,
        Err(io::StreamError::Envelope(Error::Authentication))
    ));
}

#[test]
fn range_on_truncated_or_extended_object_fails() {
    let f = 64;
    let message = encrypt(&plaintext(10 * f + 3), f as u32);
    let truncated = &message[..message.len() - 1];
    let mut cursor = std::io::Cursor::new(truncated);
    let header = parsed(&message);
    let result = io::read_range(
        &mut cursor,
        &header,
        &data_key(),
        truncated.len() as u64,
        0..1,
    );
    assert!(result.is_err());
    // Whole frames cut off: the size is still plausible, but the final frame is not there.
    let cut = &message[..message.len() - (f + REGULAR_FRAME_OVERHEAD)];
    let mut cursor = std::io::Cursor::new(cut);
    let result = io::read_range(&mut cursor, &header, &data_key(), cut.len() as u64, 0..1);
    assert!(result.is_err(), "a message missing a frame passed");
    let mut extended = message.clone();
    extended.extend_from_slice(&[0u8; REGULAR_FRAME_OVERHEAD + 64]);
    let mut cursor = std::io::Cursor::new(&extended[..]);
    let result = io::read_range(
        &mut cursor,
        &header,
        &data_key(),
        extended.len() as u64,
        0..1,
    );
    assert!(result.is_err(), "an extended message passed");
}

#[test]
fn range_outside_plaintext_rejected() {
    let message = encrypt(&plaintext(100), 64);
    for range in [100..101, 5..5, 0..101] {
        assert!(matches!(
            read_range(&message, range),
            Err(io::StreamError::Envelope(Error::Range))
        ));
    }
}

// The fuzz target's code, run on random and mutated input as part of the test suite.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parser_survives_random_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(fuzzing::decrypt_untrusted(&data).is_err());
    }

    #[test]
    fn parser_rejects_mutated_messages(
        len in 0usize..3000,
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let plaintext = plaintext(len);
        let mut message = fuzzing::seed_message(&plaintext, 64);
        prop_assert_eq!(fuzzing::decrypt_untrusted(&message), Ok(plaintext));
        let position = position.index(message.len());
        message[position] ^= flip;
        prop_assert!(fuzzing::decrypt_untrusted(&message).is_err(), "byte {} accepted", position);
    }
}

// Key rotation: a new header in front of the old body.

#[test]
fn rewrapped_header_keeps_body_valid() {
    let data = plaintext(10_000);
    let message = encrypt(&data, 4096);
    let parsed = parsed(&message);
    let new_edk = EncryptedDataKey {
        provider_id: b"other".to_vec(),
        provider_info: b"key-2".to_vec(),
        ciphertext: vec![0xCD; 48],
    };
    let header = rewrap_header(&parsed, &data_key(), vec![new_edk.clone()]).unwrap();
    let mut rewrapped = header.clone();
    rewrapped.extend_from_slice(&message[parsed.len()..]);

    let reparsed = ParsedHeader::parse(&rewrapped).unwrap().unwrap();
    assert_eq!(reparsed.header.edks, vec![new_edk]);
    assert_eq!(reparsed.header.message_id, parsed.header.message_id);
    let (released, result) = decrypt(&rewrapped);
    assert_eq!(result, Ok(()));
    assert!(released == data);
}

#[test]
fn rewrap_rejects_wrong_key_and_tampered_header() {
    let message = encrypt(b"phi", 4096);
    let parsed = parsed(&message);
    assert_eq!(
        rewrap_header(&parsed, &other_key(), vec![edk()]),
        Err(Error::Authentication)
    );
    let mut tampered = message.clone();
    tampered[5] ^= 1;
    let tampered = ParsedHeader::parse(&tampered).unwrap().unwrap();
    assert_eq!(
        rewrap_header(&tampered, &data_key(), vec![edk()]),
        Err(Error::Authentication)
    );
}
