//! `cargo run --release`: the two comparisons, one after the other.

fn main() {
    crate_choices::buckets(2_000_000);
    crate_choices::metrics(200_000);
}
