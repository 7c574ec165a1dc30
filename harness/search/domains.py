"""Each pair's datasets, built once per run (files decoded once into the decoded-image cache)
and placed for the device: :class:`DomainCache`."""

from __future__ import annotations

import json
from collections.abc import Sequence

from harness import api
from harness.data.domains import as_domain
from harness.data.placement import place
from harness.data.pooled import pool_domains
from harness.errors import DatasetError, HarnessError
from harness.search.context import Context
from harness.search.resolve import DomainRef, resolve_domain
from harness.study import spec_error
from harness.versions import package_version


class DomainCache:
    """The study's domains: resolved against the plugins when made (an unknown dataset or
    sub-domain is the study file's error), built on first use, one copy per distinct dataset."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.spec = ctx, ctx.spec
        #: pair ``i``'s sources, in the pair's order (one for most pairs)
        self.source_refs: dict[int, list[DomainRef]] = {}
        #: ``(i, "source")`` is the pair's first source (its only one, for most pairs)
        self.refs: dict[tuple[int, str], DomainRef] = {}
        for i, p in enumerate(self.spec.pairs):
            key = self.spec.pair_where(i, "source")
            self.source_refs[i] = [
                resolve_domain(self.spec, ctx.registry, s, key) for s in p.sources
            ]
            self.refs[(i, "source")] = self.source_refs[i][0]
            self.refs[(i, "target")] = resolve_domain(
                self.spec, ctx.registry, p.target, self.spec.pair_where(i, "target")
            )
        self._data: dict[str, api.DomainData] = {}

    def domain(self, i: int, side: str) -> api.DomainData:
        """Pair ``i``'s ``side`` ("source" or "target"), placed for the run's device; several
        sources are pooled into one domain (:func:`harness.data.pooled.pool_domains`)."""
        if side == "source" and len(self.source_refs[i]) > 1:
            return self._pooled(i)
        return self._one(i, side, self.refs[(i, side)])

    def _one(self, i: int, side: str, ref: DomainRef) -> api.DomainData:
        key = plugin_key(ref) + json.dumps(ref.stored_size)
        if self.spec.data.protocol == "standard":  # a domain splits by the side it is on
            key += side
        if key not in self._data:
            self._data[key] = self._build(i, side, ref)
        return self._data[key]

    def _pooled(self, i: int) -> api.DomainData:
        """Pair ``i``'s sources as one domain; they must share their classes and image shape."""
        refs = self.source_refs[i]
        key = json.dumps(["pooled", [plugin_key(r) + json.dumps(r.stored_size) for r in refs]])
        if key in self._data:
            return self._data[key]
        parts = [self._one(i, "source", r) for r in refs]
        first = parts[0]
        for part in parts[1:]:
            if part.class_names != first.class_names:
                how = class_mismatch(first.class_names, part.class_names, first.name, part.name)
                raise spec_error(
                    self.spec,
                    self.spec.pair_where(i, "source"),
                    f"sources {first.name!r} and {part.name!r} {how}; the domains of a pair "
                    "must share their classes",
                )
            if part.image_shape != parts[0].image_shape:
                raise spec_error(
                    self.spec,
                    self.spec.pair_where(i, "source"),
                    f"sources {parts[0].name!r} and {part.name!r} have images of different "
                    f"shapes ({parts[0].image_shape} and {part.image_shape}); give them one "
                    "stored_size",
                )
        name = self.spec.pairs[i].source_name
        pooled = place(
            pool_domains(name, parts),
            self.ctx.device,
            self.spec.data.placement,
            self.spec.data.device_share,
            self.ctx.log,
        )
        self._data[key] = pooled
        return pooled

    def _build(self, i: int, side: str, ref: DomainRef) -> api.DomainData:
        made, spec = self._made(i, side, ref), self.spec
        stored = spec.stored_size(isinstance(made, api.ImageFiles), ref.stored_size)
        if not isinstance(made, api.ImageFiles) and not isinstance(stored, int):
            stored = spec.image_size
        try:
            data = as_domain(
                made,
                stored,
                seed=spec.seed,
                protocol=spec.data.protocol,
                role=side,
                plugin_key=pixels_key(ref),
                log=self.ctx.log,
                what=f"dataset factory of plugin {ref.entry.plugin!r} ({ref.entry.dist})",
            )
        except DatasetError as exc:
            raise spec_error(spec, spec.pair_where(i, side), exc) from None
        data = api.DomainData(
            name=ref.text,
            task=data.task,
            class_names=data.class_names,
            train=data.train,
            val=data.val,
            test=data.test,
            fingerprint=data.fingerprint,
            meta=data.meta,
        )
        return place(
            data, self.ctx.device, spec.data.placement, spec.data.device_share, self.ctx.log
        )

    def _made(self, i: int, side: str, ref: DomainRef) -> api.DomainData | api.ImageFiles:
        """What the dataset plugin makes of the reference; its errors are the study file's."""
        size = self.spec.stored_size(False, ref.stored_size)
        if not isinstance(size, int):  # a generated domain is square: made at image_size
            size = self.spec.image_size
        try:
            return ref.entry.factory(ref.sub, image_size=size, seed=self.spec.seed, **ref.options)
        except TypeError as exc:
            raise spec_error(
                self.spec, self.spec.pair_where(i, side), f"dataset {ref.entry.name!r}: {exc}"
            ) from None
        except HarnessError as exc:
            raise spec_error(self.spec, self.spec.pair_where(i, side), exc) from None

    def pair_data(self, i: int) -> tuple[api.DomainData, api.DomainData]:
        """Pair ``i``'s source and target; they must have the same classes."""
        source, target = self.domain(i, "source"), self.domain(i, "target")
        if source.class_names != target.class_names:
            how = class_mismatch(source.class_names, target.class_names, source.name, target.name)
            raise spec_error(
                self.spec,
                self.spec.pair_where(i),
                f"source {source.name!r} and target {target.name!r} {how}",
            )
        return source, target


def plugin_key(ref: DomainRef) -> str:
    """What identifies a domain reference: the plugin, the dataset, the sub-domain, the options."""
    return json.dumps(
        [ref.entry.plugin, ref.entry.name, ref.sub, ref.options], sort_keys=True, default=str
    )


#: options of the built-in datasets that decide the splits or what is left out, not the pixels
#: of a file: left out of the decoded-image cache's key, so that changing them decodes nothing
SPLIT_OPTIONS = frozenset({"val_fraction", "test_fraction", "skip_bad_files"})


def pixels_key(ref: DomainRef) -> str:
    """What of a domain reference the decoded-image cache keys on: the plugin, its
    distribution's version, the dataset, the sub-domain and the options but those that only
    split (the files, their sizes and times, the size and resize rule are the cache's own)."""
    options = {k: v for k, v in ref.options.items() if k not in SPLIT_OPTIONS}
    version = package_version(ref.entry.dist) if ref.entry.dist else None
    return json.dumps(
        [ref.entry.plugin, ref.entry.dist, version, ref.entry.name, ref.sub, options],
        sort_keys=True,
        default=str,
    )


def class_difference(
    source: Sequence[str], target: Sequence[str], names: tuple[str, str] = ("source", "target")
) -> str:
    """What differs between two class lists, naming the classes (or the order, if only that);
    ``names`` say what each list is of (``only in source: ...``)."""
    only_source = [c for c in source if c not in target]
    only_target = [c for c in target if c not in source]
    if not only_source and not only_target:
        return f"the same classes in another order: {list(source)} vs {list(target)}"
    parts = [f"only in {names[0]}: {', '.join(map(repr, only_source))}"] if only_source else []
    parts += [f"only in {names[1]}: {', '.join(map(repr, only_target))}"] if only_target else []
    return "; ".join(parts)


def class_mismatch(first: Sequence[str], second: Sequence[str], a: str, b: str) -> str:
    """How the class lists of domains ``a`` and ``b`` differ, as what follows their names in an
    error: ``have different classes (only in 'a': ...)`` or, for one set of classes in two
    orders (labels would mean different classes), ``have the same classes in another order``."""
    if sorted(first) == sorted(second):
        return f"have the same classes in another order ({list(first)} vs {list(second)})"
    return f"have different classes ({class_difference(first, second, (repr(a), repr(b)))})"
