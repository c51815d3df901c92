"""Pure decoding and formatting for the `fastpath` CLI: map entries from the
header's layouts, joined views (services, conntrack, endpoints), tables.
No kernel, agent or network access: everything here is tested without root."""
