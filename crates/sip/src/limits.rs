//! Size caps every listener applies (see `docs/sip.md`).

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A whole message, headers and body.
    pub max_message: usize,
    pub max_start_line: usize,
    /// One header line, folded continuations included.
    pub max_header_line: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 64 * 1024,
            max_start_line: 4 * 1024,
            max_header_line: 8 * 1024,
            max_headers: 256,
        }
    }
}
