"""initagent.flags: istio-iptables drop-in parsing (pure, no kernel)."""
import ipaddress
import shlex
from pathlib import Path

import pytest

from initagent.flags import CaptureConfig, EgressRule, FlagError, parse, parse_go_duration

DATA = Path(__file__).resolve().parents[1] / "data" / "istio"
TEMPLATE_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                 "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]


def test_defaults():
    cfg = parse([], {})
    assert isinstance(cfg, CaptureConfig)
    assert (cfg.proxy_port, cfg.inbound_capture_port, cfg.inbound_tunnel_port) == (15001, 15006, 15008)
    assert cfg.proxy_uids == (1337,) and cfg.proxy_gids == (1337,)
    assert not cfg.outbound_include_all and cfg.outbound_include_cidrs == ()
    assert cfg.inbound_ports is None and not cfg.inbound_all
    assert cfg.owner_groups_include is None and cfg.owner_groups_exclude == ()
    assert cfg.loopback_cidr == ipaddress.ip_network("127.0.0.1/32")
    assert cfg.egress_allow is None and cfg.bpffs == "/sys/fs/bpf"
    assert cfg.probe_timeout_s == 5.0 and cfg.probe_port == 15002
    assert cfg.unsupported == ()


def test_template_args():
    cfg = parse(TEMPLATE_ARGS, {})
    assert cfg.outbound_include_all and cfg.outbound_exclude_cidrs == ()
    assert cfg.inbound_all and cfg.inbound_exclude_ports == (15090, 15021, 15020)
    assert cfg.interception_mode == "REDIRECT" and not cfg.tproxy


def test_every_golden_config_parses():
    lines = (DATA / "iptables-golden" / "CONFIGS.tsv").read_text().splitlines()[1:]
    assert len(lines) >= 20
    for line in lines:
        name, flags, env_text, _notes = line.split("\t")
        env = dict(kv.split("=", 1) for kv in env_text.split()) if env_text != "-" else {}
        cfg = parse(shlex.split(flags), env)
        assert cfg.proxy_port == 15001, name
        virt_with_include = " -k " in flags and " -i " in flags   # -k alone is supported (inbound engineer)
        assert bool(cfg.unsupported) == ("TPROXY" in flags or "--drop-invalid" in flags or virt_with_include), name


def test_uid_gid_lists_and_gid_default():
    cfg = parse(["-u", "3,4", "-g", "1,2"], {})
    assert cfg.proxy_uids == (3, 4) and cfg.proxy_gids == (1, 2)
    assert parse(["-u", "1234"], {}).proxy_gids == (1234,)
    assert parse([], {"PROXY_UID": "5", "PROXY_GID": "6"}).proxy_gids == (6,)
    assert parse(["-u", "7"], {"PROXY_UID": "5"}).proxy_uids == (7,)  # CLI > env
    assert parse([], {}, lookup_uid=lambda name: 999 if name == "istio-proxy" else None).proxy_uids == (999,)
    assert parse([], {"ENVOY_USER": "nobody-here"}, lookup_uid=lambda name: None).proxy_uids == (1337,)


def test_precedence_cli_env_default():
    assert parse([], {"ISTIO_SERVICE_CIDR": "10.0.0.0/8"}).outbound_include_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse(["-i", ""], {"ISTIO_SERVICE_CIDR": "10.0.0.0/8"}).outbound_include_cidrs == ()
    assert parse([], {"INBOUND_CAPTURE_PORT": "16006"}).inbound_capture_port == 16006
    assert parse([], {"ENVOY_PORT": "1"}).proxy_port == 15001  # -p has no env in istio
    # additional env names, applied after the primary one
    assert parse([], {"ISTIO_META_DNS_CAPTURE": "true"}).redirect_dns
    assert not parse([], {"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"}).redirect_dns
    assert parse([], {"INVALID_DROP": "1"}).drop_invalid
    assert parse([], {"ISTIO_DUAL_STACK": "True"}).dual_stack
    assert not parse(["--dual-stack=false"], {"ISTIO_DUAL_STACK": "true"}).dual_stack


def test_invalid_bool_env_is_ignored_with_warning():
    cfg = parse([], {"ISTIO_META_DNS_CAPTURE": "yes"})
    assert not cfg.redirect_dns and any("ISTIO_META_DNS_CAPTURE" in w for w in cfg.warnings)


def test_flag_syntaxes():
    for argv in (["-p", "16001"], ["-p16001"], ["-p=16001"], ["--envoy-port", "16001"], ["--envoy-port=16001"]):
        assert parse(argv, {}).proxy_port == 16001, argv
    assert parse(["-n"], {}).dry_run and parse(["--dry-run=true"], {}).dry_run
    assert parse(["-p", "1", "-p", "2"], {}).proxy_port == 2  # last wins


def test_list_parsing_drops_empty_items():
    cfg = parse(["-o", "6000,7000,", "-q", ",80", "-c", "eth1,,eth2"], {})
    assert cfg.outbound_exclude_ports == (6000, 7000)
    assert cfg.outbound_include_ports == (80,)
    assert cfg.exclude_interfaces == ("eth1", "eth2")


def test_cidrs_host_bits_and_families():
    cfg = parse(["-i", "10.1.2.3/8,2001:db8::1/32", "-x", "1.1.0.0/16"], {})
    assert cfg.outbound_include_cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert cfg.outbound_exclude_cidrs == (ipaddress.ip_network("1.1.0.0/16"),)
    assert parse(["-i", "127.1.2.3/32"], {}).include_has_loopback
    assert not parse(["-i", "*"], {}).include_has_loopback


@pytest.mark.parametrize("argv,fragment", [
    (["-i", "10.0.0.1"], "invalid CIDR"),
    (["-i", "10.0.0.0/33"], "prefix length"),
    (["-x", "*"], "OUTBOUND_IP_RANGES_EXCLUDE"),
    (["-x", "*,10.0.0.0/8"], "invalid CIDR"),
    (["-i", "10.0.0.0/255.0.0.0"], "invalid CIDR"),
    (["-o", "http"], "invalid port"),
    (["-q", "70000"], "out of range"),
    (["-p", "0"], "port 0"),
    (["-u", "istio-proxy"], "numeric id"),
    (["--bogus"], "unknown flag"),
    (["-Y"], "unknown shorthand"),
    (["my", "custom", "args"], "unexpected argument"),
    (["-p"], "needs an argument"),
    (["--dry-run=maybe"], "invalid boolean"),
    (["--probe-timeout", "5"], "probe-timeout"),
    (["--force-iptables-binary", "xyz"], "force-iptables-binary"),
    (["--egress-allow", "10.0.0.0/8:99999"], "out of range"),
    (["--egress-allow", "10.0.0.0/8:9-1"], "port range"),
    (["--egress-allow", "nonsense"], "egress-allow"),
])
def test_bad_input_is_one_line_error(argv, fragment):
    with pytest.raises(FlagError) as info:
        parse(argv, {})
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_env_errors():
    with pytest.raises(FlagError, match="loopback"):
        parse([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.0/8"})
    with pytest.raises(FlagError, match="between /8 and /32"):
        parse([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/7"})
    with pytest.raises(FlagError, match="exceed"):
        parse([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(g) for g in range(65))})
    assert parse([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8"}).loopback_cidr.prefixlen == 8


def test_owner_groups():
    cfg = parse([], {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"})
    assert cfg.owner_groups_include is None and cfg.owner_groups_exclude == ("888", "ftp")
    cfg = parse([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "9"})
    assert cfg.owner_groups_include == ("java", "202") and cfg.owner_groups_exclude == ()
    assert parse([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ""}).owner_groups_include == ()


def test_inbound_ports():
    assert parse(["-b", ""], {}).inbound_ports is None
    assert parse(["-b", "4000,5000"], {}).inbound_ports == (4000, 5000)
    assert parse(["-b", "*"], {}).inbound_all


def test_egress_allow_formats():
    cfg = parse(["--egress-allow", "10.1.0.0/16:9092,10.2.0.0/16,10.3.0.0/16:8000-8100,[2001:db8::/32]:443,2001:db9::/32,10.9.9.9"], {})
    net = ipaddress.ip_network
    assert cfg.egress_allow == (
        EgressRule(net("10.1.0.0/16"), 9092, 9092), EgressRule(net("10.2.0.0/16")),
        EgressRule(net("10.3.0.0/16"), 8000, 8100), EgressRule(net("2001:db8::/32"), 443, 443),
        EgressRule(net("2001:db9::/32")), EgressRule(net("10.9.9.9/32")))
    assert parse(["--egress-allow", ""], {}).egress_allow == ()          # present but empty: guard on
    assert parse([], {"BPFINIT_EGRESS_ALLOW": "10.0.0.0/8"}).egress_allow == (EgressRule(net("10.0.0.0/8")),)
    assert str(EgressRule(net("2001:db8::/32"), 443, 443)) == "[2001:db8::/32]:443"


def test_own_flags_and_tproxy():
    cfg = parse(["--cgroup", "/sys/fs/cgroup/x", "--bpffs=/tmp/b", "--netns", "/run/netns/a",
                 "--kernel-headers", "/usr/src/h", "--accelerate"], {})
    assert (cfg.cgroup, cfg.bpffs, cfg.netns, cfg.kernel_headers, cfg.accelerate) == \
        ("/sys/fs/cgroup/x", "/tmp/b", "/run/netns/a", "/usr/src/h", True)
    assert parse([], {"BPFINIT_ACCELERATE": "true"}).accelerate
    cfg = parse(["-m", "TPROXY"], {})
    assert cfg.tproxy and any("TPROXY" in r for r in cfg.unsupported)
    assert parse(["-m", "tproxy"], {}).unsupported == ()  # only the exact value counts
    assert parse(["-m", "TPROXY"], {}, supported=lambda c: ()).unsupported == ()


# The acceleration self-test waivers, and pod-to-pod (same plumbing): (flag, config field, env alias)
WAIVERS = [("accelerate-skip-splice-check", "accelerate_skip_splice_check", "BPFINIT_ACCEL_SKIP_SPLICE_CHECK"),
           ("accelerate-skip-backpressure-check", "accelerate_skip_backpressure_check",
            "BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK"),
           ("accelerate-skip-waitall-check", "accelerate_skip_waitall_check", "BPFINIT_ACCEL_SKIP_WAITALL_CHECK"),
           ("accelerate-pod-to-pod", "accelerate_pod_to_pod", "BPFINIT_ACCEL_POD_TO_POD")]
waivers = pytest.mark.parametrize("flag, field, env_name", WAIVERS,
                                  ids=["splice", "backpressure", "waitall", "pod-to-pod"])


@waivers
def test_accelerate_waiver_flag_and_env(flag, field, env_name):
    assert not getattr(parse(["--accelerate"], {}), field)                        # off by default
    cfg = parse(["--accelerate", f"--{flag}"], {})
    assert cfg.accelerate and getattr(cfg, field)
    # independent waivers: this one sets no other
    assert [f for _, f, _ in WAIVERS if getattr(cfg, f)] == [field]
    # the env alias (BPFINIT_ACCEL_SKIP_SPLICE_CHECK=1 is historical) takes "1" and "true"
    for value in ("1", "true"):
        assert getattr(parse(["--accelerate"], {env_name: value}), field)
    assert not getattr(parse(["--accelerate"], {env_name: "0"}), field)
    # CLI > env: an explicit false (the webhook's annotation "false") beats the env
    assert not getattr(parse([f"--{flag}=false"], {env_name: "1"}), field)
    bad = parse([], {env_name: "yes"})
    assert not getattr(bad, field) and any(env_name in w for w in bad.warnings)
    with pytest.raises(FlagError, match=flag):
        parse([f"--{flag}=maybe"], {})


def test_accelerate_waivers_round_trip():
    """The args the webhook appends (splice, backpressure, waitall, then pod-to-pod) parse back to the same config."""
    flags = [f"--{flag}" for flag, _, _ in WAIVERS]
    argv = TEMPLATE_ARGS[1:] + ["--accelerate", *flags]
    assert parse(argv, {}) == parse(TEMPLATE_ARGS + ["--accelerate", *(f"{f}=true" for f in flags)], {})
    d = parse(argv, {}).to_dict()
    assert all(d[field] is True for _, field, _ in WAIVERS)


@waivers
def test_accelerate_waiver_without_accelerate_is_harmless(flag, field, env_name):
    """Meaningless without --accelerate: accepted, no error, no warning, nothing unsupported (the agent only
    looks at it inside the acceleration self-test, which does not run, or, for pod-to-pod, next to the
    accelerate bit of pod_cfg.flags, which stays off)."""
    cfg = parse([f"--{flag}"], {})
    assert getattr(cfg, field) and not cfg.accelerate
    assert (cfg.warnings, cfg.unsupported) == ((), ())


def test_durations_and_to_dict():
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25 and parse_go_duration("0") == 0
    d = parse(["-i", "10.0.0.0/8", "--egress-allow", "10.0.0.0/8:1"], {}).to_dict()
    assert d["outbound_include_cidrs"] == ["10.0.0.0/8"] and d["egress_allow"] == ["10.0.0.0/8:1"]


def test_invalid_typed_env_is_ignored_with_warning():
    """istio's BindEnv does `_ = fs.Set(name, env)`: an env value the uint16/duration flag rejects is
    dropped and the default stays (audit: IPTABLES_PROBE_PORT=abc used to abort setup)."""
    for env, field, default in (({"IPTABLES_PROBE_PORT": "abc"}, "probe_port", 15002),
                                ({"IPTABLES_PROBE_PORT": "70000"}, "probe_port", 15002),
                                ({"IPTABLES_PROBE_PORT": "-1"}, "probe_port", 15002),
                                ({"PROBE_TIMEOUT": "abc"}, "probe_timeout_s", 5.0),
                                ({"PROBE_TIMEOUT": "5"}, "probe_timeout_s", 5.0)):
        cfg = parse([], env)
        (name, value), = env.items()
        assert getattr(cfg, field) == default, env
        assert len(cfg.warnings) == 1 and name in cfg.warnings[0] and "\n" not in cfg.warnings[0], cfg.warnings
    # valid env values apply, with Go's syntax (ParseUint base 0, ParseDuration)
    assert parse([], {"IPTABLES_PROBE_PORT": "16002"}).probe_port == 16002
    assert parse([], {"IPTABLES_PROBE_PORT": "0x3a9a"}).probe_port == 0x3a9a
    assert parse([], {"PROBE_TIMEOUT": "1m30s"}).probe_timeout_s == 90.0
    # a rejected env value does not hide a good CLI value, and the CLI still wins over a good env one
    assert parse(["--iptables-probe-port", "1"], {"IPTABLES_PROBE_PORT": "abc"}).probe_port == 1
    assert parse(["--probe-timeout=2s"], {"PROBE_TIMEOUT": "9s"}).probe_timeout_s == 2.0


@pytest.mark.parametrize("argv", [["--iptables-probe-port", "abc"], ["--iptables-probe-port=70000"],
                                  ["--probe-timeout", "abc"], ["--probe-timeout=5"]])
def test_invalid_typed_cli_value_is_an_error(argv):
    with pytest.raises(FlagError) as err:
        parse(argv, {})
    assert "\n" not in str(err.value) and argv[0].split("=")[0] in str(err.value)


def test_help_is_not_an_unknown_flag():
    from initagent.flags import HelpRequested, usage
    for argv in (["--help"], ["-h"], ["-i", "*", "--help"]):
        with pytest.raises(HelpRequested):
            parse(argv, {})
    with pytest.raises(FlagError) as err:   # a flag's value is not help: "-h" is a bad CIDR here
        parse(["-x", "-h"], {})
    assert not isinstance(err.value, HelpRequested) and "CIDR" in str(err.value)
    text = usage()
    assert "--network-namespace" in text and "NETWORK_NAMESPACE" in text and "--egress-allow" in text
