"""Who is asking: tokens of a team and a role, who may do what, the audit trail."""
