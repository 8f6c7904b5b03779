//! The tessera image format.
//!
//! * [`chunker`] cuts file contents into content-defined chunks (FastCDC 2020,
//!   min 16 KiB, avg 64 KiB, max 256 KiB).
//! * [`pack`] stores compressed chunks back to back followed by a table of contents
//!   and a fixed-size footer, so a pack is readable by HTTP Range alone.
//! * [`index`] is the merged filesystem tree of an image with per-file chunk lists.
//!
//! Everything here is *format*: `docs/format.md` is the normative description and the
//! golden-vector tests pin the bytes.

pub mod chunker;
pub mod digest;
pub mod index;
pub mod media;
pub mod pack;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher, OciDigest};

/// Version of the tessera format written by this crate (index and pack).
pub const FORMAT_VERSION: u32 = 2;
