//! The command line's parsing: values, conflicts, defaults and habits.
use clap::error::ErrorKind;

use super::*;
use crate::kernel::events::Family;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("netwatch").chain(args.iter().copied()))
}

#[test]
fn no_subcommand_means_watch() {
    let cli = parse(&["--port", "80", "--json"]).unwrap();
    assert!(cli.command.is_none());
    assert_eq!(cli.watch.filters.port, Some(80));
    assert_eq!(cli.watch.format(), Format::Json);
    let cli = parse(&["watch", "-6", "--transition", "syn_sent:established"]).unwrap();
    let Some(Command::Watch(args)) = cli.command else { panic!("not watch") };
    let filter = args.filter();
    assert_eq!(filter.family, Some(Family::Ipv6));
    assert_eq!(filter.transition, Some((TcpState::SynSent, TcpState::Established)));
}

#[test]
fn bad_values_are_usage_errors_naming_the_value() {
    for (args, needle) in [
        (&["--state", "SYN_SEND"][..], "'SYN_SEND'"),
        (&["--port", "70000"][..], "70000"),
        (&["watch", "--transition", "LISTEN"][..], "OLD:NEW"),
        (&["--ring-size", "5000"][..], "5000"),
    ] {
        let error = parse(args).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation, "{args:?}");
        assert!(error.to_string().contains(needle), "{args:?}: {error}");
        assert_eq!(error.exit_code(), 2);
    }
    let error = parse(&["--state", "bogus"]).unwrap_err().to_string();
    assert!(error.contains("ESTABLISHED, SYN_SENT"), "lists accepted names: {error}");
}

#[test]
fn table_takes_ss_style_flags_and_a_filter() {
    let cli = parse(&["ls", "-tanp", "state", "established", "sport", ">=", ":1024"]).unwrap();
    let Some(Command::Table(args)) = cli.command else { panic!("not table") };
    assert!(args.select.tcp && args.select.all && args.numeric && !args.select.udp);
    assert_eq!(args.select.filter, ["state", "established", "sport", ">=", ":1024"]);
    assert_eq!(parse(&["table", "-l", "-a"]).unwrap_err().kind(), ErrorKind::ArgumentConflict);
}

#[test]
fn options_may_follow_the_filter_and_unknown_ones_are_named() {
    let cli = parse(&["table", "-tl", "sport", "=", ":7200", "--json", "-n"]).unwrap();
    let Some(Command::Table(args)) = cli.command else { panic!("not table") };
    assert!(args.json && args.numeric && args.select.listening);
    assert_eq!(args.select.filter, ["sport", "=", ":7200"]);
    for args in [&["table", "-H"][..], &["table", "-tanpZ"], &["table", "sport", "=", ":1", "-H"]] {
        let error = parse(args).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::UnknownArgument, "{args:?}");
        assert!(error.to_string().contains("unexpected argument '-"), "{args:?}: {error}");
    }
    let cli = parse(&["history", "dport", "=", ":5432", "--json"]).unwrap();
    let Some(Command::History(args)) = cli.command else { panic!("not history") };
    assert!(args.json);
}

#[test]
fn no_subcommand_is_top_on_a_terminal_unless_the_stream_is_asked_for() {
    let cli = parse(&[]).unwrap();
    assert!(cli.default_is_top(true) && !cli.default_is_top(false));
    for stream in [&["--stream"][..], &["--json"], &["--port", "80"], &["--log", "x"]] {
        assert!(!parse(stream).unwrap().default_is_top(true), "{stream:?}");
    }
    assert!(parse(&["--top", "--port", "80"]).unwrap().default_is_top(false));
    let top = parse(&["--pid", "42", "--no-agent"]).unwrap();
    assert!(top.default_is_top(true));
    let args = top.default_top();
    assert_eq!((args.select.pid, args.programs.no_agent), (Some(42), true));
    assert_eq!(parse(&["--top", "--stream"]).unwrap_err().kind(), ErrorKind::ArgumentConflict);
    let Some(Command::Top(args)) = parse(&["top", "-tn", "dport", "=", ":443"]).unwrap().command
    else {
        panic!("not top")
    };
    assert!(args.select.tcp && args.numeric);
    assert_eq!(args.select.filter, ["dport", "=", ":443"]);
}

#[test]
fn netstat_and_ss_habits_parse() {
    let parse_habit = |args: &[&str]| {
        let args = std::iter::once("netwatch").chain(args.iter().copied()).map(Into::into);
        Cli::try_parse_from(habits::rewrite(args.collect()))
    };
    let Some(Command::Table(args)) = parse_habit(&["-tanpe"]).unwrap().command else {
        panic!("not table")
    };
    assert!(args.extended && args.processes && args.select.all && args.numeric);
    let Some(Command::Table(args)) = parse_habit(&["-tanic"]).unwrap().command else {
        panic!("not table")
    };
    assert!(args.info && args.continuous == Some(Duration::from_secs(1)));
    let Some(Command::Counters(args)) = parse_habit(&["-st"]).unwrap().command else {
        panic!("not counters")
    };
    assert!(args.tcp && !args.udp && args.interval.is_none());
    let Some(Command::Counters(args)) =
        parse(&["counters", "--interval", "2", "listen"]).unwrap().command
    else {
        panic!("not counters")
    };
    assert_eq!((args.interval, args.names), (Some(Duration::from_secs(2)), vec!["listen".into()]));
    assert_eq!(parse(&["table", "-c", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
}

#[test]
fn ipv4_and_ipv6_conflict() {
    let error = parse(&["-4", "-6"]).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
    assert_eq!(error.exit_code(), 2);
}

#[test]
fn a_replay_with_no_subcommand_is_top_on_a_terminal() {
    let cli = parse(&["--replay", "/var/log/netwatch/events.ndjson", "--step"]).unwrap();
    assert!(cli.default_is_top(true), "top, paused");
    assert_eq!(cli.default_top().replay.replay, cli.watch.replay.replay);
    assert!(cli.default_top().replay.step);
    let cli = parse(&["--replay", "events.ndjson", "--json"]).unwrap();
    assert!(!cli.default_is_top(true), "--json asks for the stream");
    assert!(parse(&["--speed", "10"]).is_err(), "--speed needs --replay");
}
