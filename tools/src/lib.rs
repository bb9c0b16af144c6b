//! What the tools share: real daemon processes and their `/proc` figures
//! ([`procs`]), and SVG charts ([`svg`]) for the benchmark and soak reports.

pub mod procs;
pub mod svg;
