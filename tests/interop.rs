//! Interoperability with AWS's Python Encryption SDK, both ways: it decrypts what callseal writes
//! with a Raw AES master key over the same wrapping key, and callseal decrypts what it writes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use callseal::envelope::{self, Decryptor, EncryptionContext, Encryptor, io as eio};
use callseal::ids::{ObjectId, PracticeId};
use callseal::keys::KeyDirectory;

const WAV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/audio/call-recording.wav"
);

struct Keys {
    _dir: tempfile::TempDir,
    directory: KeyDirectory,
    practice: PracticeId,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let directory = KeyDirectory::new(dir.path());
        let practice = PracticeId::new("clinic-1").unwrap();
        directory.generate(&practice).unwrap();
        Keys {
            _dir: dir,
            directory,
            practice,
        }
    }

    fn file(&self, version: u32) -> PathBuf {
        self.directory
            .root()
            .join(format!("{}/v{version}.key", self.practice))
    }

    fn name(&self, version: u32) -> String {
        format!("{}/v{version}", self.practice)
    }

    fn object(&self, call: &str, artifact: &str) -> ObjectId {
        ObjectId::new(
            self.practice.clone(),
            call.parse().unwrap(),
            artifact.parse().unwrap(),
        )
    }

    /// Encrypts with callseal's library, as the gateway and `callseal encrypt` do.
    fn encrypt(&self, object: &ObjectId, plaintext: &[u8], frame_length: u32) -> Vec<u8> {
        let keys = self.directory.load(&self.practice).unwrap();
        let context = EncryptionContext::for_object(object);
        let (data_key, edk) = keys.generate_data_key(&context).unwrap();
        let encryptor = Encryptor::new(&data_key, vec![edk], context, frame_length).unwrap();
        let mut message = Vec::new();
        eio::encrypt(encryptor, plaintext, &mut message, |_| {}).unwrap();
        message
    }

    /// Decrypts with callseal's library after checking the expected context.
    fn decrypt(&self, message: &[u8], expected: &EncryptionContext) -> Result<Vec<u8>, String> {
        let mut input = message;
        let (parsed, body_start) = eio::read_header(&mut input).map_err(|e| e.to_string())?;
        envelope::check_context(&parsed.header, expected).map_err(|e| e.to_string())?;
        let keys = self.directory.load(&self.practice).unwrap();
        let data_key = keys
            .unwrap(&parsed.header.edks, &parsed.header.context)
            .map_err(|e| e.to_string())?;
        let decryptor = Decryptor::new(&parsed, &data_key).map_err(|e| e.to_string())?;
        let mut plaintext = Vec::new();
        eio::decrypt_body(decryptor, &body_start, input, &mut plaintext, |_| {})
            .map_err(|e| e.to_string())?;
        Ok(plaintext)
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 ^ (i >> 9) as u8).collect()
}

#[test]
fn esdk_decrypts_callseal_messages() {
    let keys = Keys::new();
    let object = keys.object("call_0001", "recording.wav");
    for frame_length in [4096u32, 65536] {
        let f = frame_length as usize;
        for len in [0, 1, f - 1, f, f + 1, 16 * f, 16 * f + 1] {
            let plaintext = pattern(len);
            let message = keys.encrypt(&object, &plaintext, frame_length);
            let (decrypted, header) =
                common::esdk_decrypt(&keys.file(1), &keys.name(1), &message).unwrap();
            assert!(
                decrypted == plaintext,
                "frame {frame_length}, size {len}: bytes differ"
            );
            assert_eq!(header["algorithm_suite_id"], 0x0478, "{header}");
            assert_eq!(header["frame_length"], frame_length);
            assert_eq!(header["encryption_context"]["practice"], "clinic-1");
            assert_eq!(header["encryption_context"]["call"], "call_0001");
            assert_eq!(header["encryption_context"]["artifact"], "recording.wav");
        }
    }
}

#[test]
fn esdk_decrypts_callseal_wav() {
    let keys = Keys::new();
    let wav = fs::read(WAV).unwrap();
    let object = keys.object("call_0001", "recording.wav");
    let message = keys.encrypt(&object, &wav, envelope::DEFAULT_FRAME_LENGTH);
    let (decrypted, _) = common::esdk_decrypt(&keys.file(1), &keys.name(1), &message).unwrap();
    assert!(decrypted == wav);
}

#[test]
fn esdk_decrypts_large_callseal_message() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let plaintext = pattern(24 * 1024 * 1024 + 3);
    let message_path = dir.path().join("message");
    let output_path = dir.path().join("plaintext");
    fs::write(
        &message_path,
        keys.encrypt(&keys.object("c", "a"), &plaintext, 65536),
    )
    .unwrap();
    let key = (keys.file(1), keys.name(1));
    common::esdk_decrypt_file(&[(&key.0, &key.1)], &message_path, &output_path).unwrap();
    assert!(fs::read(&output_path).unwrap() == plaintext);
}

#[test]
fn esdk_rejects_tampered_callseal_message() {
    let keys = Keys::new();
    let mut message = keys.encrypt(&keys.object("c", "a"), &pattern(10_000), 4096);
    let middle = message.len() / 2;
    message[middle] ^= 1;
    assert!(common::esdk_decrypt(&keys.file(1), &keys.name(1), &message).is_err());
}

#[test]
fn esdk_decrypts_after_rotation() {
    let keys = Keys::new();
    let object = keys.object("c", "a");
    let old = keys.encrypt(&object, b"before rotation", 4096);
    keys.directory.rotate(&keys.practice).unwrap();
    let new = keys.encrypt(&object, b"after rotation", 4096);

    let (_, header) = common::esdk_decrypt(&keys.file(2), &keys.name(2), &new).unwrap();
    assert_eq!(
        header["encrypted_data_keys"][0]["key_name"], "clinic-1/v2",
        "{header}"
    );
    let both = [(keys.file(1), keys.name(1)), (keys.file(2), keys.name(2))];
    let both: Vec<(&Path, &str)> = both
        .iter()
        .map(|(f, n)| (f.as_path(), n.as_str()))
        .collect();
    let (plaintext, _) = common::esdk_decrypt_with_keys(&both, &old).unwrap();
    assert_eq!(plaintext, b"before rotation");
    assert!(common::esdk_decrypt(&keys.file(2), &keys.name(2), &old).is_err());
}

#[test]
fn callseal_decrypts_esdk_messages() {
    let keys = Keys::new();
    let object_pairs = [
        ("practice", "clinic-1"),
        ("call", "call_0001"),
        ("artifact", "recording.wav"),
    ];
    let contexts: [&[(&str, &str)]; 2] = [&[], &object_pairs];
    for frame_length in [4096u32, 65536] {
        let f = frame_length as usize;
        for context in contexts {
            for len in [0, 1, f, 2 * f, 16 * f, 16 * f + 1] {
                let plaintext = pattern(len);
                let message = common::esdk_encrypt(
                    &keys.file(1),
                    &keys.name(1),
                    frame_length,
                    context,
                    &plaintext,
                );
                let expected = EncryptionContext::from_pairs(context.iter().copied()).unwrap();
                let decrypted = keys.decrypt(&message, &expected);
                let case = format!("frame {frame_length}, size {len}, context {context:?}");
                assert!(decrypted.as_deref() == Ok(&plaintext[..]), "{case}");
            }
        }
    }
}

#[test]
fn callseal_rejects_esdk_message_for_other_call() {
    let keys = Keys::new();
    let context = [
        ("practice", "clinic-1"),
        ("call", "call_0001"),
        ("artifact", "a"),
    ];
    let message = common::esdk_encrypt(&keys.file(1), &keys.name(1), 4096, &context, b"phi");
    let other_call = EncryptionContext::for_object(&keys.object("call_0002", "a"));
    let error = keys.decrypt(&message, &other_call).unwrap_err();
    assert!(error.contains("`call` does not match"), "{error}");
}

#[test]
fn callseal_decrypts_esdk_wav() {
    let keys = Keys::new();
    let wav = fs::read(WAV).unwrap();
    let object = keys.object("call_0001", "recording.wav");
    let context = EncryptionContext::for_object(&object);
    let pairs: Vec<(&str, &str)> = context.iter().collect();
    let message = common::esdk_encrypt(&keys.file(1), &keys.name(1), 65536, &pairs, &wav);
    let decrypted = keys.decrypt(&message, &context).unwrap();
    assert!(decrypted == wav);
}
