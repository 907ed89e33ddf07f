//! netstat's and ss's short options typed to `netwatch` itself, out of habit: `netwatch
//! -tanp` means `netwatch table -tanp`, and `netwatch -s` (`-st`, `-su`) means `netwatch
//! counters`. The arguments are rewritten before clap parses them, so that everything after
//! follows the subcommand's own rules and errors. And `-c`'s number of seconds is optional,
//! as netstat's `-c` takes none: a filter word after it gets `-c`'s default in between, so
//! that clap does not take the word for the number.
use std::ffi::OsString;

/// Letters that make a first argument `table`'s: netstat's and ss's listing options.
const TABLE_LETTERS: &str = "tuanlpeioc46";
/// Letters that may come with `-s` (netstat -s): which protocols, and all counters.
const COUNTERS_LETTERS: &str = "stua";

/// `args` (the program first), with a habitual first option turned into its subcommand.
pub fn rewrite(mut args: Vec<OsString>) -> Vec<OsString> {
    subcommand_of_habit(&mut args);
    optional_seconds(&mut args);
    args
}

/// A first argument of netstat's letters becomes the subcommand they mean.
fn subcommand_of_habit(args: &mut Vec<OsString>) {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else { return };
    let Some(letters) = first.strip_prefix('-').filter(|l| !l.is_empty() && !l.starts_with('-'))
    else {
        return;
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
}

/// After `table` or `counters`, `-c` (alone or last in a group) with no number after it gets
/// `1`. The long forms take what follows, as clap has it: a word there is an error.
fn optional_seconds(args: &mut Vec<OsString>) {
    if !args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| matches!(a, "table" | "ls" | "counters"))
    {
        return;
    }
    let mut at = 2;
    while at < args.len() {
        let takes = args[at]
            .to_str()
            .is_some_and(|a| a.starts_with('-') && !a.starts_with("--") && a.ends_with('c'));
        let number =
            args.get(at + 1).and_then(|n| n.to_str()).is_some_and(|n| n.parse::<f64>().is_ok());
        if takes && !number {
            args.insert(at + 1, "1".into());
            at += 1;
        }
        at += 1;
    }
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

    #[test]
    fn continuous_takes_its_default_before_a_filter_word() {
        assert_eq!(
            rewritten(&["-tanc", "sport", "=", ":80"]),
            ["table", "-tanc", "1", "sport", "=", ":80"]
        );
        assert_eq!(rewritten(&["table", "-c", "2", "-n"]), ["table", "-c", "2", "-n"]);
        assert_eq!(rewritten(&["table", "-n", "-c"]), ["table", "-n", "-c", "1"]);
        assert_eq!(rewritten(&["counters", "-c", "listen"]), ["counters", "-c", "1", "listen"]);
        assert_eq!(
            rewritten(&["counters", "--interval", "soon"]),
            ["counters", "--interval", "soon"]
        );
        assert_eq!(rewritten(&["watch", "-c"]), ["watch", "-c"], "not watch's");
    }
}
