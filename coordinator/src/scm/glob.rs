//! Branch patterns for pipelines: which branches a pipeline builds. A pattern is matched
//! against a whole branch name (without `refs/heads/`); it never touches the repository.
//!
//! - `*` matches any run of characters except `/`, including none: `release/*` matches
//!   `release/1.0` but not `release/1.0/hotfix` nor `release`.
//! - `**` matches any run of characters, `/` included, including none: `feature/**` matches
//!   `feature/a` and `feature/a/b` (and `feature/`), not `feature`; `**` alone matches every
//!   branch.
//! - Every other character matches itself; there is no `?`, `[...]` or escaping, because git
//!   forbids `?`, `[` and `\` in branch names anyway.

/// One piece of a compiled pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `*`: anything but `/`.
    Star,
    /// `**`: anything.
    DoubleStar,
}

fn tokens(pattern: &str) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '*' {
            tokens.push(Token::Literal(c));
            continue;
        }
        // Three or more stars in a row mean the same as two.
        let mut double = false;
        while chars.next_if_eq(&'*').is_some() {
            double = true;
        }
        tokens.push(if double { Token::DoubleStar } else { Token::Star });
    }
    tokens
}

/// Whether `branch` matches `pattern` (see the module's documentation for the syntax).
///
/// The work is at most proportional to the pattern's length times the branch's length (one
/// pass of dynamic programming, no backtracking), whatever the input.
pub fn branch_matches(pattern: &str, branch: &str) -> bool {
    let branch: Vec<char> = branch.chars().collect();
    // matched[i]: the pattern's tokens seen so far match the first i characters of the branch.
    let mut matched = vec![false; branch.len() + 1];
    matched[0] = true;
    for token in tokens(pattern) {
        let mut next = vec![false; branch.len() + 1];
        match token {
            Token::Literal(expected) => {
                for i in 0..branch.len() {
                    next[i + 1] = matched[i] && branch[i] == expected;
                }
            }
            Token::Star | Token::DoubleStar => {
                next[0] = matched[0];
                for i in 0..branch.len() {
                    let may_extend = token == Token::DoubleStar || branch[i] != '/';
                    next[i + 1] = matched[i + 1] || (next[i] && may_extend);
                }
            }
        }
        matched = next;
    }
    matched[branch.len()]
}

#[cfg(test)]
mod tests {
    use super::branch_matches;

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(branch_matches("main", "main"));
        assert!(!branch_matches("main", "main2"));
        assert!(!branch_matches("main", "mai"));
        assert!(!branch_matches("main", "feature/main"));
        assert!(branch_matches("", ""));
        assert!(!branch_matches("", "main"));
    }

    #[test]
    fn a_single_star_stays_within_one_segment() {
        assert!(branch_matches("*", "main"));
        assert!(branch_matches("*", ""));
        assert!(!branch_matches("*", "release/1.0"));
        assert!(branch_matches("release/*", "release/1.0"));
        assert!(branch_matches("release/*", "release/"));
        assert!(!branch_matches("release/*", "release"));
        assert!(!branch_matches("release/*", "release/1.0/hotfix"));
        assert!(!branch_matches("release/*", "other/1.0"));
        assert!(branch_matches("release-*", "release-2024"));
        assert!(branch_matches("*-stable", "v1-stable"));
        assert!(!branch_matches("*-stable", "v1/x-stable"));
        assert!(branch_matches("v*.*", "v1.2"));
        assert!(!branch_matches("v*.*", "v12"));
        assert!(branch_matches("*/*", "a/b"));
        assert!(!branch_matches("*/*", "a/b/c"));
    }

    #[test]
    fn a_double_star_crosses_segments() {
        assert!(branch_matches("**", "main"));
        assert!(branch_matches("**", "a/b/c"));
        assert!(branch_matches("feature/**", "feature/a"));
        assert!(branch_matches("feature/**", "feature/a/b/c"));
        assert!(!branch_matches("feature/**", "feature"));
        assert!(!branch_matches("feature/**", "features/a"));
        assert!(branch_matches("**/hotfix", "release/1/hotfix"));
        assert!(!branch_matches("**/hotfix", "hotfix"));
        assert!(branch_matches("a/**/z", "a/b/c/z"));
        assert!(branch_matches("a/***", "a/b/c"), "three stars mean two");
    }

    #[test]
    fn non_ascii_and_long_inputs_are_handled() {
        assert!(branch_matches("fix/é*", "fix/été"));
        assert!(!branch_matches("fix/é*", "fix/ete"));
        // Many stars against a long near-miss: quadratic at worst, never exponential.
        let pattern = "*a".repeat(200);
        let branch = "a".repeat(199);
        assert!(!branch_matches(&pattern, &branch));
        assert!(branch_matches(&pattern, &"a".repeat(200)));
    }
}
