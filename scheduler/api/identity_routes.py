"""The API's routes for tokens (``/tokens``, admin only) and the audit trail (``/audit``)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from scheduler.api.auth import Auth, Caller, audit_target
from scheduler.api.views import NOT_FOUND
from scheduler.auth.audit import AuditEvent
from scheduler.auth.identity import Role, audit_team, check_admin
from scheduler.auth.tokens import TokenRecord

_TEAM = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # as a training config's team


class TokenIn(BaseModel):
    """A token to create: for which team, with which role, under which name."""

    model_config = ConfigDict(extra="forbid")

    team: str = Field(pattern=_TEAM)
    role: Role
    name: str | None = Field(default=None, min_length=1, max_length=100)


class TokenOut(BaseModel):
    id: str
    name: str
    team: str
    role: Role
    created_at: float
    created_by: str | None
    revoked_at: float | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself: shown this once, never stored.")


class AuditOut(BaseModel):
    id: int
    at: float
    token_id: str | None
    token_name: str | None
    team: str | None
    role: str | None
    method: str
    path: str
    target: str | None
    status: int


def _out(record: TokenRecord) -> TokenOut:
    return TokenOut.model_validate(record, from_attributes=True)


def _audit_out(event: AuditEvent) -> AuditOut:
    return AuditOut.model_validate(event, from_attributes=True)


def identity_routes(app: FastAPI, auth: Auth) -> None:
    tokens = auth.tokens

    @app.post("/tokens", status_code=201, response_model=TokenCreated)
    async def create_token(body: TokenIn, request: Request, who: Caller) -> TokenCreated:
        """Create a token (admin); the answer holds the token, shown this once."""
        check_admin(who, "create tokens")
        name = body.name or f"{body.role} of {body.team}"
        record, secret = await asyncio.to_thread(
            tokens.create, body.team, body.role, name, who.token_id
        )
        audit_target(request, f"token {record.id}")
        return TokenCreated(**_out(record).model_dump(), token=secret)

    @app.get("/tokens", response_model=list[TokenOut])
    def list_tokens(who: Caller) -> list[TokenOut]:
        """Every token, revoked ones too (admin); never a secret."""
        check_admin(who, "list tokens")
        return [_out(r) for r in tokens.list()]

    @app.delete("/tokens/{token_id}", response_model=TokenOut, responses=NOT_FOUND)
    def revoke_token(token_id: str, request: Request, who: Caller) -> TokenOut:
        """Revoke a token (admin): refused from now on."""
        audit_target(request, f"token {token_id}")
        check_admin(who, "revoke tokens")
        return _out(tokens.revoke(token_id))

    @app.get("/audit", response_model=list[AuditOut])
    def audit(
        who: Caller,
        team: str | None = None,
        token_id: str | None = None,
        since: float | None = Query(default=None, description="Epoch seconds."),
        limit: int = Query(default=100, ge=1, le=10000),
    ) -> list[AuditOut]:
        """Mutating requests, newest first: all of them for an admin, the token's own
        team's for anyone else."""
        events = auth.audit.find(
            team=audit_team(who, team), token_id=token_id, since=since, limit=limit
        )
        return [_audit_out(e) for e in events]
