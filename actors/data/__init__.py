"""The data layer owned by the persistence actor: model, credentials, listing, SQL."""
