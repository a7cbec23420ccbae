//! Criterion benches of the sans-IO cores live in `benches/`: `cargo bench -p portcullis-benches`.
