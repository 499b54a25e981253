"""etl: loads a legacy REST API behind OAuth2 client credentials into a SQL database."""

__version__ = "0.1.0"
