"""The seed README's two examples, in Python 3 with phonon_cli imports."""

from __future__ import annotations

import threading

from phonon_cli import LruCache, Process, Update


def test_reference_example(redis_url, namespace) -> None:
    written: list[tuple[str, dict]] = []
    record: dict[str, str] = {}

    def get_email(record: dict) -> str:
        return "me@example.com"

    def get_address(record: dict) -> str:
        return "1 Main St"

    def write_record_to_database(record: dict) -> None:
        written.append(("write", dict(record)))

    p1 = Process(redis_url, namespace=namespace)
    address_lookup_service = p1.create_reference(resource="me")
    p2 = Process(redis_url, namespace=namespace)
    email_verification_service = p2.create_reference(resource="me")

    def lookup_email_and_apply_to_record(record, reference):
        email = get_email(record)
        try:
            with email_verification_service.lock():
                record["email"] = email
                if email_verification_service.count() == 1:
                    write_record_to_database(record)
        except Process.AlreadyLocked:
            pass

    def verify_address_and_apply_to_record(record, reference):
        address = get_address(record)
        try:
            with address_lookup_service.lock():
                record["address"] = address
                if address_lookup_service.count() == 1:
                    write_record_to_database(record)
        except Process.AlreadyLocked:
            pass

    t1 = threading.Thread(
        target=lookup_email_and_apply_to_record, args=(record, email_verification_service)
    )
    t2 = threading.Thread(
        target=verify_address_and_apply_to_record, args=(record, address_lookup_service)
    )
    t1.start()
    t2.start()
    t1.join()
    t2.join()

    # Both processes still hold "me", so neither was the last: nothing written yet.
    assert written == []
    assert record == {"email": "me@example.com", "address": "1 Main St"}
    assert address_lookup_service.count() == 2
    p1.stop()
    assert email_verification_service.count() == 1
    p2.stop()


executed: list[tuple[str, dict]] = []


class UserUpdate(Update):
    def state(self):
        return {}

    def clear(self):
        self.doc = {}

    def merge(self, other):
        for k, v in other.doc.items():
            if k in self.doc:
                self.doc[k] += v
            else:
                self.doc[k] = v

    def execute(self):
        executed.append((self._id, dict(self.doc)))


def test_update_example(redis_url, namespace) -> None:
    user_updates = [{"user_id": f"u{i % 3}", "logins": 1, "pages": i} for i in range(10)]
    executed.clear()

    lru_cache = LruCache(max_entries=10000)

    p = Process(redis_url, namespace=namespace)
    for user_update in user_updates:
        doc = {k: v for k, v in user_update.items() if k != "user_id"}
        lru_cache.set(
            user_update["user_id"], UserUpdate(process=p, _id=user_update["user_id"], doc=doc)
        )

    lru_cache.expire_all()
    p.stop()

    assert sorted(executed) == [
        ("u0", {"logins": 4, "pages": 0 + 3 + 6 + 9}),
        ("u1", {"logins": 3, "pages": 1 + 4 + 7}),
        ("u2", {"logins": 3, "pages": 2 + 5 + 8}),
    ]
