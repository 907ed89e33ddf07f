//! netstat's and ss's short options typed to `netwatch` itself, out of habit: `netwatch
//! -tanp` means `netwatch table -tanp`, and `netwatch -s` (`-st`, `-su`) means `netwatch
//! counters`. The arguments are rewritten before clap parses them, so that everything after
//! follows the subcommand's own rules and errors.
use std::ffi::OsString;

/// Letters that make a first argument `table`'s: netstat's and ss's listing options.
const TABLE_LETTERS: &str = "tuanlpeioc46";
/// Letters that may come with `-s` (netstat -s): which protocols, and all counters.
const COUNTERS_LETTERS: &str = "stua";

/// `args` (the program first), with a habitual first option turned into its subcommand.
pub fn rewrite(mut args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else { return args };
    let Some(letters) = first.strip_prefix('-').filter(|l| !l.is_empty() && !l.starts_with('-'))
    else {
        return args;
    };
    let only = |set: &str| letters.chars().all(|c| set.contains(c));
    if letters.contains('s') && only(COUNTERS_LETTERS) {
        let rest: String = letters.chars().filter(|&c| c != 's').collect();
        args[1] = "counters".into();
        if !rest.is_empty() {
            args.insert(2, format!("-{rest}").into());
        }
    } else if only(TABLE_LETTERS) && letters.chars().any(|c| !"46".contains(c)) {
        args.insert(1, "table".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(args: &[&str]) -> Vec<String> {
        let args = std::iter::once("netwatch").chain(args.iter().copied()).map(OsString::from);
        rewrite(args.collect()).into_iter().skip(1).map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn listing_options_mean_table_and_s_means_counters() {
        assert_eq!(rewritten(&["-tanpe"]), ["table", "-tanpe"]);
        assert_eq!(
            rewritten(&["-tulpn", "sport", "=", ":22"]),
            ["table", "-tulpn", "sport", "=", ":22"]
        );
        assert_eq!(rewritten(&["-s"]), ["counters"]);
        assert_eq!(rewritten(&["-st", "--json"]), ["counters", "-t", "--json"]);
        for unchanged in
            [&["-4"][..], &["-6", "--json"], &["--port", "80"], &["-v"], &["top", "-t"], &[]]
        {
            assert_eq!(rewritten(unchanged), unchanged, "{unchanged:?}");
        }
        assert_eq!(rewritten(&["-tx"]), ["-tx"], "an unknown letter is left for clap to name");
    }
}
