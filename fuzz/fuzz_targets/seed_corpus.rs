//! Writes valid messages under the fuzz key into `corpus/message_parser`, so the fuzzer starts
//! from inputs whose header authenticates and mutates the frames behind it.

use callseal::envelope::fuzzing::seed_message;

fn main() -> std::io::Result<()> {
    let directory = std::path::Path::new("corpus/message_parser");
    std::fs::create_dir_all(directory)?;
    let cases: [(usize, u32); 6] = [(0, 64), (1, 64), (64, 64), (200, 64), (1000, 17), (5000, 4096)];
    for (length, frame_length) in cases {
        let plaintext: Vec<u8> = (0..length).map(|i| i as u8).collect();
        let name = format!("seed-{length}-{frame_length}");
        std::fs::write(directory.join(name), seed_message(&plaintext, frame_length))?;
    }
    Ok(())
}
