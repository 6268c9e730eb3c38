//! Criterion benchmarks of Trellis's hot paths live in `benches/`; run them
//! with `cargo bench -p trellis-benches`. This library is empty on purpose:
//! cargo needs a target to hang the benches on.
