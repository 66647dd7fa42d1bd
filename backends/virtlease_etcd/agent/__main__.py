"""``python -m virtlease_etcd.agent``: the agent (``virtlease-agent``)."""

import sys

from .command import main

sys.exit(main())
