# The two secrets the instances need, both in Secrets Manager (encrypted with the stack's key),
# both read by each instance at boot with its role (templates/aws_fetch.py) into root-only files
# that systemd hands to the service; neither is in the user data, which anyone allowed to
# describe the instances can read.

# --- Server secret (HMAC key of join codes) ------------------------------------------------------

# One for all instances, never stored in Redis, written to Secrets Manager through a write-only
# argument, so that it is in no plan and no state: two random UUIDs without their hyphens, 64 hex
# digits (uuid() formats 16 bytes from crypto/rand; it changes on every run, but a write-only
# value is written only when server_secret_version changes). Each instance reads it at boot into
# /etc/beach-road/secret (0600), which deploy/beach-road-secret.conf hands to the service as a
# systemd credential (BEACH_ROAD_SECRET_FILE).
resource "aws_secretsmanager_secret" "server_secret" {
  #checkov:skip=CKV2_AWS_57: no automatic rotation on purpose. The value is the HMAC key of join codes: a new value makes every live session's code stop matching, and instances only read it at boot. Rotation is a deliberate operator step (raise server_secret_version: new value, instance refresh), see README.
  name_prefix = "${var.name}-server-secret-"
  description = "beach-road: HMAC key of join codes, shared by all instances"
  kms_key_id  = aws_kms_key.this.arn
}

resource "aws_secretsmanager_secret_version" "server_secret" {
  secret_id                = aws_secretsmanager_secret.server_secret.id
  secret_string_wo         = replace("${uuid()}${uuid()}", "-", "")
  secret_string_wo_version = var.server_secret_version
}

# --- Redis AUTH token ----------------------------------------------------------------------------

# Where the token comes from, first match wins:
#   1. redis_auth_token_secret_arn: an existing secret (SecretString = the token) made outside
#      this stack. Terraform reads it to configure ElastiCache.
#   2. redis_auth_token (sensitive variable, e.g. TF_VAR_redis_auth_token from a CI secret store).
#   3. random_password: 64 letters and digits.
# In every case the token IS in the Terraform state: aws_elasticache_replication_group.auth_token
# is not a write-only argument (AWS provider 5.x), so the state keeps it (marked sensitive), and
# with 2 and 3 so does the secret version (and random_password with 3). Keep the state in an
# encrypted backend with restricted access (e.g. S3 with SSE-KMS). Only the server secret above
# stays out of the state.
locals {
  redis_auth_external = var.redis_auth_token_secret_arn != ""
  # nonsensitive: whether a token was given is no secret, and count cannot use sensitive values.
  redis_auth_from_var = nonsensitive(var.redis_auth_token != null)

  redis_auth_secret_arn = local.redis_auth_external ? var.redis_auth_token_secret_arn : aws_secretsmanager_secret.redis_auth[0].arn
  redis_auth_token = (local.redis_auth_external ? data.aws_secretsmanager_secret_version.redis_auth[0].secret_string
  : local.redis_auth_from_var ? var.redis_auth_token : random_password.redis_auth[0].result)
}

data "aws_secretsmanager_secret_version" "redis_auth" {
  count     = local.redis_auth_external ? 1 : 0
  secret_id = var.redis_auth_token_secret_arn
}

# Letters and digits only: ElastiCache forbids / " @ % and spaces, and a plain token needs no
# escaping anywhere (the boot helper percent-encodes it into REDIS_URL all the same).
resource "random_password" "redis_auth" {
  count   = !local.redis_auth_external && !local.redis_auth_from_var ? 1 : 0
  length  = 64
  special = false
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57: no Lambda rotation: the token must change in ElastiCache (auth_token_update_strategy ROTATE keeps old and new valid) and the instances read it only at boot, so rotation is a Terraform change plus an instance refresh, see README.
  count       = local.redis_auth_external ? 0 : 1
  name_prefix = "${var.name}-redis-auth-"
  description = "beach-road: ElastiCache AUTH token"
  kms_key_id  = aws_kms_key.this.arn
}

# secret_string rather than the write-only argument: the token is in the state anyway (see above),
# and a tracked value keeps this secret equal to what ElastiCache was given.
resource "aws_secretsmanager_secret_version" "redis_auth" {
  count         = local.redis_auth_external ? 0 : 1
  secret_id     = aws_secretsmanager_secret.redis_auth[0].id
  secret_string = local.redis_auth_token
}

# --- The instances may read these two secrets, and nothing else ----------------------------------

data "aws_iam_policy_document" "secrets" {
  statement {
    sid       = "ReadTheTwoSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.server_secret.arn, local.redis_auth_secret_arn]
  }

  # Secrets Manager decrypts with the caller's permission; only through Secrets Manager.
  statement {
    sid       = "DecryptThemThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = compact([aws_kms_key.this.arn, var.redis_auth_token_kms_key_arn])
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${var.region}.${local.dns_suffix}"]
    }
  }
}

resource "aws_iam_role_policy" "secrets" {
  name   = "read-beach-road-secrets"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.secrets.json
}
