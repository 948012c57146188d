//! Bad PEFT input (placeholder filled below).
mod common;
