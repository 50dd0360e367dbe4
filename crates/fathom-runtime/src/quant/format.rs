//! The llama.cpp (ggml) block formats Fathom multiplies without expanding them: each stores a run
//! of `block_elems` weights of one row in `block_bytes` bytes. Layouts are ggml's (`ggml-common.h`
//! block structs, little-endian); [`super::blocks`] decodes them.

/// A block-quantised weight format, numbered as ggml's `ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
}

impl Format {
    pub const ALL: [Format; 12] = [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q2K,
        Format::Q3K,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
        Format::IQ4NL,
        Format::IQ4XS,
    ];

    /// Weights per block.
    pub const fn block_elems(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => 32,
            Format::IQ4NL => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q2K => 84,
            Format::Q3K => 110,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
            Format::IQ4NL => 18,
            Format::IQ4XS => 136,
        }
    }

    /// The activation scale group its kernel wants (see `activation.rs`): 256 for the formats
    /// with 256-weight super-blocks, else 32.
    pub const fn act_group(self) -> usize {
        self.block_elems()
    }

    /// ggml's type id (`GGML_TYPE_*`, as GGUF files store it).
    pub const fn ggml_type(self) -> u32 {
        match self {
            Format::Q4_0 => 2,
            Format::Q4_1 => 3,
            Format::Q5_0 => 6,
            Format::Q5_1 => 7,
            Format::Q8_0 => 8,
            Format::Q2K => 10,
            Format::Q3K => 11,
            Format::Q4K => 12,
            Format::Q5K => 13,
            Format::Q6K => 14,
            Format::IQ4NL => 20,
            Format::IQ4XS => 23,
        }
    }

    pub fn from_ggml_type(id: u32) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.ggml_type() == id)
    }

    /// llama.cpp's name (`q4_K`, `iq4_xs`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q8_0 => "q8_0",
            Format::Q2K => "q2_K",
            Format::Q3K => "q3_K",
            Format::Q4K => "q4_K",
            Format::Q5K => "q5_K",
            Format::Q6K => "q6_K",
            Format::IQ4NL => "iq4_nl",
            Format::IQ4XS => "iq4_xs",
        }
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_elems() as f64
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
