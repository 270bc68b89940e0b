//! Request classes: input length × output length, three bands each (nine
//! classes). The cut points are configuration; the defaults are those of
//! the twin's calibration anchors (docs/twin.md).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Number of request classes (3 input bands × 3 output bands).
pub const CLASS_COUNT: usize = 9;

/// A length band: short, medium or long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LengthBand {
    /// Below the medium cut point.
    Short,
    /// At or above the medium cut point, below the long one.
    Medium,
    /// At or above the long cut point.
    Long,
}

impl LengthBand {
    /// All bands, shortest first.
    pub const ALL: [LengthBand; 3] = [LengthBand::Short, LengthBand::Medium, LengthBand::Long];

    fn letter(self) -> char {
        match self {
            LengthBand::Short => 'S',
            LengthBand::Medium => 'M',
            LengthBand::Long => 'L',
        }
    }

    fn from_letter(c: char) -> Option<Self> {
        match c.to_ascii_uppercase() {
            'S' => Some(LengthBand::Short),
            'M' => Some(LengthBand::Medium),
            'L' => Some(LengthBand::Long),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A request class, named by two letters: input band then output band
/// (`SS`, `SM`, …, `LL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestClass {
    /// Band of the prompt length.
    pub input: LengthBand,
    /// Band of the output length.
    pub output: LengthBand,
}

impl RequestClass {
    /// All nine classes in index order (`SS, SM, SL, MS, …, LL`).
    pub const ALL: [RequestClass; CLASS_COUNT] = {
        let b = LengthBand::ALL;
        let mut out = [RequestClass { input: LengthBand::Short, output: LengthBand::Short }; CLASS_COUNT];
        let mut i = 0;
        while i < CLASS_COUNT {
            out[i] = RequestClass { input: b[i / 3], output: b[i % 3] };
            i += 1;
        }
        out
    };

    /// Dense index 0..9, input-major.
    pub fn index(self) -> usize {
        self.input.index() * 3 + self.output.index()
    }

    /// The class with a given dense index.
    pub fn from_index(i: usize) -> RequestClass {
        Self::ALL[i]
    }

    /// Two-letter name, e.g. `SL`.
    pub fn name(self) -> String {
        format!("{}{}", self.input.letter(), self.output.letter())
    }

    /// Parse a two-letter name (case-insensitive).
    pub fn parse(s: &str) -> Result<RequestClass, String> {
        let mut chars = s.trim().chars();
        match (chars.next(), chars.next(), chars.next()) {
            (Some(a), Some(b), None) => match (LengthBand::from_letter(a), LengthBand::from_letter(b)) {
                (Some(input), Some(output)) => Ok(RequestClass { input, output }),
                _ => Err(format!("unknown request class `{s}`: expected two letters of S, M, L (e.g. SS, ML)")),
            },
            _ => Err(format!("unknown request class `{s}`: expected two letters of S, M, L (e.g. SS, ML)")),
        }
    }
}

impl fmt::Display for RequestClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.input.letter(), self.output.letter())
    }
}

impl TryFrom<String> for RequestClass {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        RequestClass::parse(&s)
    }
}

impl From<RequestClass> for String {
    fn from(c: RequestClass) -> String {
        c.name()
    }
}

/// Cut points between the length bands, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassBoundaries {
    /// Prompts with at least this many tokens are medium.
    pub input_medium_min_tokens: u32,
    /// Prompts with at least this many tokens are long.
    pub input_long_min_tokens: u32,
    /// Outputs with at least this many tokens are medium.
    pub output_medium_min_tokens: u32,
    /// Outputs with at least this many tokens are long.
    pub output_long_min_tokens: u32,
}

impl Default for ClassBoundaries {
    fn default() -> Self {
        ClassBoundaries {
            input_medium_min_tokens: 256,
            input_long_min_tokens: 1024,
            output_medium_min_tokens: 100,
            output_long_min_tokens: 350,
        }
    }
}

impl ClassBoundaries {
    fn band(tokens: u32, medium: u32, long: u32) -> LengthBand {
        if tokens >= long {
            LengthBand::Long
        } else if tokens >= medium {
            LengthBand::Medium
        } else {
            LengthBand::Short
        }
    }

    /// The class of a request with these prompt and output lengths.
    pub fn classify(&self, input_tokens: u32, output_tokens: u32) -> RequestClass {
        RequestClass {
            input: Self::band(input_tokens, self.input_medium_min_tokens, self.input_long_min_tokens),
            output: Self::band(output_tokens, self.output_medium_min_tokens, self.output_long_min_tokens),
        }
    }

    /// Check the cut points are increasing.
    pub fn validate(&self) -> Result<(), String> {
        if self.input_medium_min_tokens >= self.input_long_min_tokens {
            return Err(format!(
                "input_medium_min_tokens ({}) must be below input_long_min_tokens ({})",
                self.input_medium_min_tokens, self.input_long_min_tokens
            ));
        }
        if self.output_medium_min_tokens >= self.output_long_min_tokens {
            return Err(format!(
                "output_medium_min_tokens ({}) must be below output_long_min_tokens ({})",
                self.output_medium_min_tokens, self.output_long_min_tokens
            ));
        }
        Ok(())
    }
}

/// What an engine instance serves: both phases of a request (`colocated`, as engines do by
/// default), or one phase of a phase-split pool (`prefill`: prompts only, its KV cache handed to
/// a decode instance; `decode`: the tokens after the first, from a handed-over KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceRole {
    /// Prefill and decode on the same instance.
    #[default]
    Colocated,
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
}

impl InstanceRole {
    /// Every role.
    pub const ALL: [InstanceRole; 3] = [InstanceRole::Colocated, InstanceRole::Prefill, InstanceRole::Decode];

    /// Parse a name (`colocated`, `prefill` or `decode`).
    pub fn parse(s: &str) -> Result<InstanceRole, String> {
        match s {
            "colocated" => Ok(InstanceRole::Colocated),
            "prefill" => Ok(InstanceRole::Prefill),
            "decode" => Ok(InstanceRole::Decode),
            other => Err(format!("unknown role `{other}`; valid: colocated, prefill, decode")),
        }
    }
}

impl fmt::Display for InstanceRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceRole::Colocated => "colocated",
            InstanceRole::Prefill => "prefill",
            InstanceRole::Decode => "decode",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_parses_from_its_name_and_nothing_else() {
        for r in InstanceRole::ALL {
            assert_eq!(InstanceRole::parse(&r.to_string()), Ok(r));
        }
        assert_eq!(InstanceRole::default(), InstanceRole::Colocated);
        let err = InstanceRole::parse("Prefill").unwrap_err();
        assert!(err.contains("`Prefill`") && err.contains("colocated, prefill, decode"), "{err}");
    }

    #[test]
    fn default_cut_points_put_boundary_lengths_in_the_upper_band() {
        let b = ClassBoundaries::default();
        assert_eq!(b.classify(255, 99).name(), "SS");
        assert_eq!(b.classify(256, 100).name(), "MM");
        assert_eq!(b.classify(1024, 350).name(), "LL");
        assert_eq!(b.classify(1023, 349).name(), "MM");
        assert_eq!(b.classify(10, 5000).name(), "SL");
    }

    #[test]
    fn names_and_indices_round_trip() {
        for (i, c) in RequestClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(RequestClass::parse(&c.name()).unwrap(), *c);
        }
        assert_eq!(RequestClass::ALL[0].name(), "SS");
        assert_eq!(RequestClass::ALL[8].name(), "LL");
        assert!(RequestClass::parse("XL").unwrap_err().contains("XL"));
        assert!(RequestClass::parse("SSS").is_err());
    }
}
