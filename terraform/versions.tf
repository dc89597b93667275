terraform {
  # 1.11: write-only arguments (the server secret's secret_string_wo).
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # aws_secretsmanager_secret_version.secret_string_wo; checked with 5.100.
      version = ">= 5.90, < 6.0"
    }
    # random_password: the default Redis AUTH token.
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Application = var.name }, var.tags)
  }
}
