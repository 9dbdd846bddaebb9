"""Sans-io policy: rules, verdicts, the name table and the decision functions.

No trio, no cffi, no syscalls (``load_allow_file`` reads one file). The supervisor asks
``decide_connect`` / ``decide_dns`` and, when the decision came from the mode's default
(``Decision.by_default``), may hand the request to a user callback.
"""

from ._always import ALWAYS_DENIED as ALWAYS_DENIED
from ._always import GATEWAY_V4 as GATEWAY_V4
from ._always import GATEWAY_V6 as GATEWAY_V6
from ._always import always_denied as always_denied
from ._always import embedded_ipv4 as embedded_ipv4
from ._decide import ConnectRequest as ConnectRequest
from ._decide import DnsQuery as DnsQuery
from ._decide import Policy as Policy
from ._decide import claimed_name as claimed_name
from ._decide import claims_can_deny as claims_can_deny
from ._decide import decide_connect as decide_connect
from ._decide import decide_dns as decide_dns
from ._decide import parse_host_port as parse_host_port
from ._names import Answer as Answer
from ._names import NameTable as NameTable
from ._process import Process as Process
from ._process import Scope as Scope
from ._rules import Rule as Rule
from ._rules import load_allow_file as load_allow_file
from ._rules import normalize_ip as normalize_ip
from ._rules import normalize_name as normalize_name
from ._rules import parse_rules as parse_rules
from ._verdict import ALLOW as ALLOW
from ._verdict import CALLBACK_ERROR as CALLBACK_ERROR
from ._verdict import Decision as Decision
from ._verdict import Verdict as Verdict
from ._verdict import check_callbacks as check_callbacks
from ._verdict import deny as deny
from ._verdict import from_callback as from_callback
from ._verdict import from_callback_error as from_callback_error

__all__ = [
    "ALLOW",
    "ALWAYS_DENIED",
    "CALLBACK_ERROR",
    "Answer",
    "ConnectRequest",
    "Decision",
    "DnsQuery",
    "GATEWAY_V4",
    "GATEWAY_V6",
    "NameTable",
    "Policy",
    "Process",
    "Rule",
    "Scope",
    "Verdict",
    "always_denied",
    "check_callbacks",
    "claimed_name",
    "claims_can_deny",
    "decide_connect",
    "decide_dns",
    "deny",
    "embedded_ipv4",
    "from_callback",
    "from_callback_error",
    "load_allow_file",
    "normalize_ip",
    "normalize_name",
    "parse_host_port",
    "parse_rules",
]
