"""What the broker remembers: instances, instance-token accessors, leases, revocation
jobs and the audit log. Never a token or a credential value."""
