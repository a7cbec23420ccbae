//! The chunked decoder on bytes that arrive in arbitrary pieces, in both output forms: the
//! result must not depend on where the reads were cut.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_http::{ChunkedDecoder, ChunkedOutput, Decoded};

fn decode(data: &[u8], step: usize, output: ChunkedOutput) -> (Result<bool, ()>, Vec<u8>) {
    let mut decoder = ChunkedDecoder::new(output);
    let mut src = BytesMut::new();
    let mut out = BytesMut::new();
    let mut done = false;
    for piece in data.chunks(step.max(1)) {
        src.extend_from_slice(piece);
        match decoder.decode(&mut src, &mut out) {
            Ok(Decoded::Done) => {
                done = true;
                break;
            }
            Ok(_) => {}
            Err(_) => return (Err(()), out.to_vec()),
        }
    }
    (Ok(done), out.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else { return };
    let (whole, whole_out) = decode(data, data.len(), ChunkedOutput::DataOnly);
    let (pieces, pieces_out) = decode(data, step as usize, ChunkedOutput::DataOnly);
    assert_eq!(whole, pieces, "verdict depends on read boundaries");
    if whole == Ok(true) {
        assert_eq!(whole_out, pieces_out, "data depends on read boundaries");
    }
    let (re, _) = decode(data, step as usize, ChunkedOutput::Reencode);
    assert_eq!(re.is_ok(), whole.is_ok(), "the two output forms disagree");
});
